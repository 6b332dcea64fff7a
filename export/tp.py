"""Tensor parallelism of the decoder: what rank r of N holds, and the all-reduces that join the ranks.

The decoder graph of rank r (`decoder.rank{r}.onnx`) is written by the unchanged graph writers of
export/decoder.py, layers.py and moe.py, given two views:
- `RankWeights(weights, tp, spec)`: `get(key)` returns rank r's slice of a checkpoint tensor (table below), so the
  writers (and any weight format applied to what `get` returns) run unchanged on a rank;
- `rank_spec(spec, tp)` (model/tp.py, shared with the runtime): the ModelSpec with per-rank head counts and intermediate widths, so the writers'
  reshapes and the rank's contract (model/contracts.py: KV cache [B, Hkv_r, K, D]) come out right.

| tensor (HF layout) | rank r holds | joined by |
|---|---|---|
| q_proj [Hq*D, C] (+bias) | rows of q heads r*Hq/N .. (r+1)*Hq/N - 1 | - |
| k_proj, v_proj [Hkv*D, C] (+bias) | rows of KV heads r*Hkv/N ..; when N > Hkv, the one head r*Hkv//N (replicated: the GQA group of the rank's q heads) | - |
| o_proj [C, Hq*D] | columns of the rank's q heads | all-reduce after o_proj |
| gate_proj, up_proj [I, C] / down_proj [C, I] | rows / columns r*I/N .. (r+1)*I/N - 1 | all-reduce after the MLP |
| experts gate_up [E, C, 2I] / down [E, I, C] (either stored layout) | every expert's gate and up columns / down rows of r*I/N .. | all-reduce after the MoE block (the routing weights are linear in the partial sums) |
| lm_head / tied embed_tokens [V, C] | rows r*ceil(V/N) .. (vocab-parallel) | logits padded to [B, V] at the rank's offset, all-reduce (exact: one non-zero term per element) |
| norms, q_norm/k_norm, router gate, everything else | whole (replicated) | - |

The all-reduce is an ONNX `DistCollective` node of domain `trt` (attributes `collective_operation="all_reduce"`,
`reduce_op="sum"`, `root=-1`, `nb_rank=N`), which the TensorRT >= 10.16 / TensorRT-RTX 1.7 ONNX parser imports as an
IDistCollectiveLayer (NCCL; `IExecutionContext::setCommunicator`). The graph carries its model-local function whose
body is `Identity`: what one rank computes alone. ONNX Runtime runs that body unless a kernel of the same name is
registered; runtime/backends/tp.py registers one that all-reduces over MPI between the rank processes.
With N = 1 nothing is inserted and nothing is sliced: the graph is today's decoder.onnx, byte for byte.
"""
from __future__ import annotations

import onnx
from onnx import helper

from qwen_vl_trt.model.errors import CheckpointError
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.tp import TensorParallel, check, rank_spec  # noqa: F401 (the export's entry points)

from .onnx_graph import OPSET, GraphBuilder

COLLECTIVE_DOMAIN = "trt"  # the domain TensorRT's ONNX parser imports DistCollective from
COLLECTIVE_OP = "DistCollective"


class RankWeights:
    """A CheckpointWeights (export/weights.py) whose `get(key)` returns rank `tp.rank`'s slice (module table).
    Reads the whole tensor, then slices: export memory stays one tensor. Of the checkpoint's other attributes only
    those that return no tensor pass through (`PASSED`); any other read would hand a rank the whole tensor, so it
    is an AttributeError until it is sliced here."""

    PASSED = frozenset({"dir", "quant", "has", "resolve", "keys"})

    def __init__(self, weights, tp: TensorParallel, spec: ModelSpec):
        self.base, self.tp, self.spec = weights, tp, spec

    def __getattr__(self, name):
        if name in RankWeights.PASSED:
            return getattr(self.base, name)
        raise AttributeError(f"RankWeights has no {name!r}: a tensor read of a tensor-parallel rank must return the "
                             "rank's slice (export/tp.py)")

    def get(self, key: str):
        t = self.base.get(key)
        return t if not self.tp.active else self.slice(key, t)

    def slice(self, key: str, t):
        """Rank `tp.rank`'s part of tensor `key` (a torch tensor in HF's layout)."""
        s, tp = self.spec.text, self.tp
        parts = key.split(".")
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", key)
        if module == "q_proj":
            lo, hi = tp.chunk(s.num_attention_heads)
            return t[lo * s.head_dim:hi * s.head_dim]
        if module in ("k_proj", "v_proj"):
            lo, hi = tp.kv_heads(s.num_key_value_heads)
            return t[lo * s.head_dim:hi * s.head_dim]
        if module == "o_proj" and kind == "weight":
            lo, hi = tp.chunk(s.num_attention_heads)
            return t[:, lo * s.head_dim:hi * s.head_dim]
        if module in ("gate_proj", "up_proj") and "experts" not in parts:
            lo, hi = tp.chunk(s.intermediate_size)
            return t[lo:hi]
        if module == "down_proj" and "experts" not in parts and kind == "weight":
            lo, hi = tp.chunk(s.intermediate_size)
            return t[:, lo:hi]
        if module == "experts":
            return self._expert_slice(key, kind, t)
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):  # only lm_head reads them in the decoder
            lo, hi = tp.vocab(s.vocab_size)
            return t[lo:hi]
        return t

    def _expert_slice(self, key: str, name: str, t):
        """gate_up [E, C, 2I] (release) / [E, 2I, C] (HF in memory): the gate and the up halves each cut to the
        rank's I/N columns; down [E, I, C] / [E, C, I]: the rank's I/N rows. Returned in HF's in-memory layout
        ([E, 2I/N, C], [E, C, I/N]), which export/moe.py `release_layout` tests first, so no shape coincidence
        (2I/N == C) can make it transpose wrongly. The stored layout is told apart as HF's loader does."""
        import torch

        moe, c = self.spec.text.moe, self.spec.text.hidden_size
        e, i = moe.num_experts, moe.moe_intermediate_size
        lo, hi = self.tp.chunk(i)
        shape = tuple(t.shape)
        if name == "gate_up_proj":
            if shape == (e, 2 * i, c):
                t = t.transpose(1, 2)
            elif shape != (e, c, 2 * i):
                raise CheckpointError(f"{key}: shape {list(shape)}, expected [{e}, {c}, {2 * i}] or [{e}, {2 * i}, {c}]")
            return torch.cat([t[..., lo:hi], t[..., i + lo:i + hi]], dim=-1).transpose(1, 2).contiguous()
        if name == "down_proj":
            if shape == (e, c, i):
                t = t.transpose(1, 2)
            elif shape != (e, i, c):
                raise CheckpointError(f"{key}: shape {list(shape)}, expected [{e}, {i}, {c}] or [{e}, {c}, {i}]")
            return t[:, lo:hi].transpose(1, 2).contiguous()
        return t


# ---- the collectives in the graph ----------------------------------------------------------------------------
def dist_collective_function() -> onnx.FunctionProto:
    """DistCollective(input) -> output as one rank alone computes it: Identity (the 1-rank reference body)."""
    return helper.make_function(COLLECTIVE_DOMAIN, COLLECTIVE_OP, ["input"], ["output"],
                                [helper.make_node("Identity", ["input"], ["output"])],
                                [helper.make_opsetid("", OPSET)],
                                attributes=["collective_operation", "reduce_op", "root", "nb_rank"],
                                doc_string=dist_collective_function.__doc__)


def all_reduce(g: GraphBuilder, x: str) -> str:
    """Sum of `x` over the ranks (any shape; the graph's compute dtype); `x` itself without tensor parallelism."""
    tp = getattr(g, "tp", None)
    if tp is None or not tp.active:
        return x
    g.add_function(dist_collective_function())
    return g.op(COLLECTIVE_OP, [x], domain=COLLECTIVE_DOMAIN, collective_operation="all_reduce", reduce_op="sum",
                root=-1, nb_rank=tp.size)


def gather_vocab(g: GraphBuilder, logits: str, vocab: int) -> str:
    """logits [B, V_r] float32 of the rank's vocabulary rows -> [B, V] on every rank: padded with zeros to its
    offset, then all-reduced (each element has exactly one non-zero term, so the sum is exact)."""
    tp = getattr(g, "tp", None)
    if tp is None or not tp.active:
        return logits
    lo, hi = tp.vocab(vocab)
    with g.scope("gather"):
        full = g.op("Pad", [logits, g.const([0, lo, 0, vocab - hi], "int64")])  # [B, V]
        return all_reduce(g, full)
