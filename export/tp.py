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

Quantized weight formats (model/weight_formats.py) compose with the split: a rank stores exactly its slice of what
the 1-rank export stores. INT4/INT8 (and FP8 quantized from a dense checkpoint) are quantized from the rank's dense
slice, which gives the 1-rank blocks when the blocks (along K) are not cut: always for the column-parallel layers,
and for the row-parallel ones when K/N is a whole number of blocks, which `check_formats` requires before anything
is written. An FP8 checkpoint's own bytes are sliced (`get_fp8`, `fp8_experts`) at any offset, its block scales
repeated at the finer block that divides the cut (`slice_blocks`).
"""
from __future__ import annotations

import onnx
from onnx import helper

from qwen_vl_trt.model.errors import CheckpointError, UserError
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
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] == "experts":
            return self._expert_slice(key, parts[-1], t)
        cut = self.cut(key)
        if cut is None:
            return t
        dim, lo, hi = cut
        return t[lo:hi] if dim == 0 else t[:, lo:hi]

    def cut(self, key: str) -> tuple[int, int, int] | None:
        """(dim, lo, hi): rank `tp.rank` holds rows (dim 0) or columns (dim 1) lo..hi-1 of the 2-D HF tensor `key`
        (a Linear weight [out, in] or a bias [out]); None when it holds the whole tensor (module table)."""
        s, tp = self.spec.text, self.tp
        parts = key.split(".")
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", key)
        if not tp.active or "experts" in parts:
            return None
        if module == "q_proj":
            lo, hi = tp.chunk(s.num_attention_heads)
            return 0, lo * s.head_dim, hi * s.head_dim
        if module in ("k_proj", "v_proj"):
            lo, hi = tp.kv_heads(s.num_key_value_heads)
            return 0, lo * s.head_dim, hi * s.head_dim
        if module == "o_proj" and kind == "weight":
            lo, hi = tp.chunk(s.num_attention_heads)
            return 1, lo * s.head_dim, hi * s.head_dim
        if module in ("gate_proj", "up_proj"):
            return 0, *tp.chunk(s.intermediate_size)
        if module == "down_proj" and kind == "weight":
            return 1, *tp.chunk(s.intermediate_size)
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):  # only lm_head reads them in the decoder
            return 0, *tp.vocab(s.vocab_size)
        return None

    def get_fp8(self, key: str):
        """Rank `tp.rank`'s slice of an FP8 weight as the checkpoint stores it (CheckpointWeights.get_fp8): the
        e4m3 bytes of its rows/columns, and the scales of the blocks they fall in at a block size that divides the
        slice's offset and extent (`slice_blocks`), so q * s is the 1-rank value element by element. None when the
        checkpoint does not store `key` as block-scaled FP8."""
        raw = self.base.get_fp8(key)
        cut = self.cut(key) if raw is not None else None
        if cut is None:
            return raw
        q, grid, blocks = raw
        dim, lo, hi = cut
        return slice_blocks(q, grid, blocks, dim - 2, lo, hi)

    def fp8_experts(self, key: str, spec=None):
        """Rank `tp.rank`'s slice of a stacked FP8 expert tensor as the checkpoint stores it, in release layout:
        (q e4m3 [E, K, N_r] or [E, K_r, N], grid, (bk, bn)) with W[e, k, n] = q[e, k, n] * grid[e, k // bk, n // bn]
        (CheckpointWeights.fp8_experts, read with the whole model's spec; `spec`, the rank's, is not used); gate_up keeps the rank's gate and up columns, down its rows,
        each cut by `slice_blocks`. None when the tensor is not block-scaled FP8."""
        import math

        import torch

        raw = self.base.fp8_experts(key, self.spec)
        if raw is None or not self.tp.active:
            return raw
        i = self.spec.text.moe.moe_intermediate_size
        lo, hi = self.tp.chunk(i)
        if key.endswith("gate_up_proj"):
            gate = slice_blocks(*raw, -1, lo, hi)
            up = slice_blocks(*raw, -1, i + lo, i + hi)
            if gate[2] != up[2]:  # the up half starts at a different offset within a block: its own finer block
                step = math.gcd(gate[2][1], up[2][1])
                gate, up = (slice_blocks(*raw, -1, a, b, step) for a, b in ((lo, hi), (i + lo, i + hi)))
            return torch.cat([gate[0], up[0]], dim=-1), torch.cat([gate[1], up[1]], dim=-1), gate[2]
        return slice_blocks(*raw, -2, lo, hi)

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


def slice_blocks(q, grid, blocks: tuple[int, int], axis: int, lo: int, hi: int, step: int | None = None):
    """Elements lo..hi-1 along `axis` (-2 or -1) of a block-scaled tensor q [.., R, C] with
    W[.., i, j] = q[.., i, j] * grid[.., i // bm, j // bn] -> (q', grid', blocks') with the same relation for the
    slice: the block along `axis` becomes b' = gcd(b, lo, hi - lo) (or `step`, a divisor of it), and grid' repeats
    each scale b / b' times and keeps the blocks the slice covers. Exact: element i of the slice reads the scale
    of block (lo + i) // b, as the whole tensor does (b' divides lo). A 128x128 grid cut at 1536/8 = 192 rows
    becomes 64-row blocks."""
    import math

    n = q.shape[axis]
    if lo == 0 and hi == n:
        return q, grid, blocks
    b = blocks[axis]
    fine = step or math.gcd(b, lo, hi - lo)
    grid = grid.repeat_interleave(b // fine, dim=axis) if b != fine else grid
    grid = grid.narrow(axis, lo // fine, -(-(hi - lo) // fine)).contiguous()
    blocks = (fine, blocks[1]) if axis == -2 else (blocks[0], fine)
    return q.narrow(axis, lo, hi - lo).contiguous(), grid, blocks


def check_formats(spec: ModelSpec, formats, size: int, fp8_checkpoint: bool) -> None:
    """Whether every rank of `size` can hold exactly its slice of what the 1-rank export stores in `formats`
    (model/weight_formats.py); a UserError line naming the first layer that cannot.

    INT4 blocks (and FP8 blocks quantized here from a dense checkpoint) run along K, the input features. The
    column-parallel layers (q/k/v, gate/up, the experts' gate_up, the vocabulary-split lm_head) split N: their
    blocks are untouched. The row-parallel layers (o_proj, down_proj, the experts' down_proj) split K into
    K/size rows per rank, whose blocks are the 1-rank blocks only when K/size is a whole number of blocks;
    otherwise the rank would quantize other blocks (other scales, other values), so it is refused rather than
    requantized. The bytes of an FP8 checkpoint are cut at any offset (`slice_blocks`), so they are not checked.
    A K that is not a whole number of INT4 blocks stays dense at 1 rank (export/int4.py), hence at every rank."""
    from qwen_vl_trt.model.weight_formats import FP8_BLOCK, INT4_BLOCK_SIZES

    if size <= 1:
        return
    t = spec.text
    rows = [("attention", "o_proj", t.num_attention_heads * t.head_dim)]
    if t.moe is None or any(not t.moe.is_sparse(i) for i in range(t.num_hidden_layers)):
        rows.append(("mlp", "mlp down_proj", t.intermediate_size))
    if t.moe is not None:
        rows.append(("experts", "experts down_proj", t.moe.moe_intermediate_size))
    int4_rows = [k // size for group, _, k in rows if getattr(formats, group) == "int4"]
    for group, layer, k in rows:
        fmt, per_rank = getattr(formats, group), k // size
        if fmt == "int4" and (k % formats.int4_block == 0 or group == "experts") and per_rank % formats.int4_block:
            fits = [b for b in INT4_BLOCK_SIZES if all(r % b == 0 for r in int4_rows)]
            hint = (f"--int4-block-size {max(fits)} would work" if fits else
                    f"no INT4 block size ({', '.join(map(str, INT4_BLOCK_SIZES))}) divides every per-rank K "
                    f"({', '.join(map(str, int4_rows))}): use a smaller --tp")
            raise UserError(f"--tp {size} with {group}=int4: {layer} (row-parallel) has K = {k} input features, "
                            f"{per_rank} per rank, not a multiple of the INT4 block {formats.int4_block}, so a rank "
                            f"cannot hold the 1-rank blocks; {hint}")
        block = min(FP8_BLOCK, k)
        if fmt == "fp8" and not fp8_checkpoint and per_rank % block:
            raise UserError(f"--tp {size} with {group}=fp8: {layer} (row-parallel) has K = {k} input features, "
                            f"{per_rank} per rank, not a multiple of the FP8 block {block} quantized from this dense "
                            "checkpoint, so a rank cannot hold the 1-rank blocks; export a Qwen FP8 checkpoint "
                            "(its blocks are sliced exactly) or use a smaller --tp")


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
