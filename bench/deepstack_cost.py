"""What DeepStack costs a vision call on the CPU (issue 24: ours' fp32 TTFT against onnxruntime-genai's, whose
Qwen3-VL pipeline has no DeepStack input).

  python bench/deepstack_cost.py ARTIFACTS IMAGE [--runs 7] [--threads 2]

Three ONNX Runtime sessions of ARTIFACTS/vision.ort.onnx on the same weights file:
- as exported: outputs vision_features [M, C] and deepstack_features [Ld, M, C];
- outputs dropped: vision_features the only output, the nodes kept. This is the graph bench/cpu_peers/oga_graphs.py
  hands onnxruntime-genai. ONNX Runtime 1.32 keeps nodes whose outputs nothing reads (its optimized model of this
  graph still holds the DeepStack mergers), so it runs them and throws their rows away;
- pruned: also the nodes vision_features does not need removed (the DeepStack mergers: Ld x LayerNorm + two Linear
  layers on the merged tokens), the cost of a pipeline without DeepStack.
Feeds: the image through runtime/pipeline.py's Preprocessor, as trt-run sends it. The runs alternate between the
sessions after one warm-up run each. Printed: the median (min-max) ms of each, and whether their vision_features are
bitwise equal (same kernels on the same rows: they must be); the FLOPs of the mergers' products, from the graph's
weight shapes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import machine, utc_now  # noqa: E402


def needed_nodes(graph, outputs: set) -> list:
    """The nodes of `graph` that `outputs` depend on, in their order (names read inside If / Loop bodies count)."""
    def reads(node) -> set:
        names = set(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for inner in sub.node:
                    names |= reads(inner)
        return names

    want, keep = set(outputs), []
    for node in reversed(graph.node):
        if want & set(node.output):
            keep.append(node)
            want |= reads(node)
    return keep[::-1]


def sessions(graph: Path, threads: int) -> dict:
    """{"full", "dropped", "pruned"}: onnxruntime sessions of `graph` (module docstring)."""
    import onnx
    import onnxruntime as ort

    def session(model):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.parent))
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    model = onnx.load(str(graph), load_external_data=False)
    out = {"full": session(model)}
    keep = [o for o in model.graph.output if o.name == "vision_features"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    out["dropped"] = session(model)
    nodes = needed_nodes(model.graph, {"vision_features"})
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out["pruned"] = session(model)
    return out


def merger_gflops(graph: Path, merged_tokens: int) -> float:
    """2 * tokens * the weights of the MatMul / Gemm nodes whose names say deepstack (export/vision.py names)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    params = sum(int(np.prod(dims[i])) for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                 and "deepstack" in n.name.lower() for i in n.input[1:2] if i in dims)
    return 2 * merged_tokens * params / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("image")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.runtime.pipeline import Preprocessor, vision_feeds
    from qwen_vl_trt.runtime.request import Request

    manifest = load_manifest(args.artifacts)
    req = Preprocessor(manifest).prepare(Request("Describe this image.", (args.image,)))
    (media,) = req.media
    feeds = vision_feeds(manifest.spec, media.pixel_values, np.asarray([media.grid_thw], np.int64))
    graph = args.artifacts / "vision.ort.onnx"
    sess = sessions(graph, args.threads)
    times = {name: [] for name in sess}
    outs = {name: s.run(["vision_features"], feeds)[0] for name, s in sess.items()}  # warm-up
    for _ in range(args.runs):
        for name, s in sess.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[name].append(1e3 * (time.perf_counter() - t))
    merged = outs["full"].shape[0]
    print(f"# DeepStack's cost in one vision call -- {utc_now()}\nmachine: {machine()}; {args.threads} threads; "
          f"{args.artifacts}; image {args.image}: {int(np.prod(media.grid_thw))} patches, {merged} merged tokens; "
          f"{args.runs} runs each, alternated")
    print("\n| vision.ort.onnx | ms median (min-max) |\n|---|---|")
    labels = {"full": "as exported (vision_features + deepstack_features)",
              "dropped": "deepstack_features dropped from the outputs (bench/cpu_peers/oga_graphs.py)",
              "pruned": "pruned to what vision_features needs (no DeepStack mergers)"}
    for name, ts in times.items():
        print(f"| {labels[name]} | {statistics.median(ts):.0f} ({min(ts):.0f}-{max(ts):.0f}) |")
    equal = all(np.array_equal(outs["full"], o) for o in outs.values())
    print(f"\nthe DeepStack mergers' products: {merger_gflops(graph, merged):.1f} GFLOP; vision_features bitwise "
          f"equal in all three: {equal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
