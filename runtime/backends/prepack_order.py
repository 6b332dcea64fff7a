"""The peak memory of ONNX Runtime's prepacking, cut by the order of the nodes it prepacks.

ONNX Runtime memory-maps each external initializer on its own, and at session creation copies every MatMul / Gemm
weight into MLAS's packed layout node by node, in the order of the graph's node list, unmapping each original once
it is packed. The peak is therefore reached while the last weights are packed: everything packed so far plus the
original and the packed copy of the weight at hand. decoder.ort.onnx ends with lm_head (1.24 GB of the 2.86 GB of
the benchmark's fp32 decoder), so its session peaked at 4.07 GB for 2.82 GB kept (docs/benchmarks.md). With the
node of the largest weight first, the peak is the packed total plus one small transient (2.87 GB there).

Only that one node moves: the others keep the graph's order, so the packed weights lie in memory in the order a
decode step reads them, layer after layer. Sorting every node by weight size (the first version of this module)
put all MLP weights before all attention weights and cost about 2 % of the decode rate (docs/benchmarks.md).

ONNX Runtime sorts the nodes itself before it runs them (the node list is not its execution order), so the graph
computes the same thing; the reordered node list breaks ONNX's topological-order rule for files, so it is never
written as a model of its own: ort_cache.cached_graph keeps the reordered graph protobuf (no weights: its initializers still
name the artifact folder's `.onnx.data` file) in the cache folder, and the session loads it from memory with
`session.model_external_initializers_file_folder_path` set to the graph's folder (OrtSession, runtime/backends/ort.py).
The cache entry is keyed like ort_cache.py's (graph files, ONNX Runtime version, providers, session config), so a
re-export makes a new one; `onnx` is imported only to write an entry, not on a warm start.
"""
from __future__ import annotations

from pathlib import Path

# part of the cache key: another order is another entry
ORDER = {"qwen_vl.prepack_order": "largest-weight-first-then-graph-order"}


def reordered(graph_path: Path) -> bytes:
    """The graph (without its external data) with the node of its largest initializer (lm_head's Gemm in a
    decoder) moved first, every other node in its place."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    sizes = {t.name: _elements(t) for t in model.graph.initializer}
    nodes = list(model.graph.node)
    weight = [max((sizes.get(i, 0) for i in n.input), default=0) for n in nodes]
    nodes.insert(0, nodes.pop(weight.index(max(weight, default=0))))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model.SerializeToString()


def _elements(tensor) -> int:
    n = 1
    for d in tensor.dims:
        n *= d
    return n
