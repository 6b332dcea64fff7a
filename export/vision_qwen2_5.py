"""Graph 1, `vision.onnx` for Qwen2.5-VL: window-attention vision encoder + patch merger (no DeepStack).

PatchEmbed (Conv3d without bias, as one MatMul) -> permute the 2x2 merge blocks into window order
(`window_index`) together with their 2-D RoPE positions -> blocks (RMSNorm, fused qkv with bias, attention
within each window of `cu_window_seqlens`, or within each image / temporal patch of `cu_seqlens` for the
blocks in fullatt_block_indexes; RMSNorm, gated SiLU MLP with biases) -> merger (RMSNorm per patch, 2x2
shuffle, Linear-GELU-Linear) -> back to the original merged-token order.

The inverse permutation (HF `argsort(window_index)`) is computed in the graph: `window_index` is a
permutation, so its argsort is its inverse, `inverse[window_index[i]] = i` (one ScatterElements). Windows
never straddle two images or temporal patches (HF tiles each frame separately), so an image segment of
cu_seqlens stays contiguous in window order and the full-attention blocks need no second permutation.

| I/O | name | dtype | shape | meaning |
|---|---|---|---|---|
| in | `pixel_values` | float32 | [num_patches, 3*2*P*P] | flattened patches in HF order (merge-block major), rows (C, Tp, P, P) |
| in | `window_index` | int64 | [num_merged] | merged-token permutation into window order (HF get_window_index) |
| in | `cu_window_seqlens` | int32 | [num_windows_1] | cumulative patch counts of the attention windows (window order) |
| in | `rotary_pos_ids` | int64 | [num_patches, 2] | (row, col) of each patch for 2-D RoPE |
| in | `cu_seqlens` | int32 | [num_frames_1] | cumulative patch counts: one attention segment per image / temporal patch |
| out | `vision_features` | DT | [num_merged, C] | merged features, one row per pad token |

The host computes `window_index` / `cu_window_seqlens` (`qwen_vl_trt.runtime.vision_inputs.window_index`, a
numpy port of `transformers.vision_utils.get_vision_window_index`), `rotary_pos_ids` and `cu_seqlens` in the
original (merge-block) order, exactly as for Qwen3-VL.
"""
from __future__ import annotations

from pathlib import Path

from onnx import helper

from qwen_vl_trt.model.contracts import vision_contract
from .layers import gated_mlp, linear, reshape, rms_norm
from .onnx_graph import ELEM, GraphBuilder
from .rotary import vision_tables
from qwen_vl_trt.model.spec import ModelSpec
from .vision import attention, patch_embed
from .weights import CheckpointWeights

NORM_EPS = 1e-6  # HF Qwen2_5_VLVisionBlock / Qwen2_5_VLPatchMerger: RMSNorm(eps=1e-6), in no config


def export_vision_qwen2_5(spec: ModelSpec, weights: CheckpointWeights, out_dir: Path, dtype: str) -> Path:
    contract = vision_contract(spec).resolve(dtype)
    g, x, path = GraphBuilder.for_contract(contract, out_dir, dtype)
    v = spec.vision
    pre = spec.weight_prefixes["visual"]

    with g.scope("visual"):
        h = patch_embed(g, weights, pre, x["pixel_values"], v.hidden_size)  # [T, Cv]
        with g.scope("window_order"):
            h = to_window_order(g, h, x["window_index"], v.merge_unit, v.hidden_size)  # [T, Cv]
            pos = to_window_order(g, x["rotary_pos_ids"], x["window_index"], v.merge_unit, 2)  # [T, 2]
        inv_freq, axis = vision_tables(v.head_dim, v.rope_theta)
        for i in range(v.depth):
            cu = x["cu_seqlens"] if i in v.fullatt_block_indexes else x["cu_window_seqlens"]
            with g.scope(f"blocks.{i}"):
                h = vision_block(g, weights, f"{pre}blocks.{i}", h, pos, cu, spec, inv_freq, axis)
        with g.scope("merger"):
            merged = merger(g, weights, f"{pre}merger", h, spec)  # [M, C], window order
        with g.scope("original_order"):
            merged = g.op("Gather", [merged, inverse_permutation(g, x["window_index"])], axis=0)  # [M, C]

    out = contract.output("vision_features")
    g.output(merged, out.name, out.dtype, out.dims)
    g.finish(path, doc=__doc__, output_order=[t.name for t in contract.outputs])
    return path


def to_window_order(g: GraphBuilder, rows: str, window_index: str, unit: int, width: int) -> str:
    """Reorder patch rows [T, width] by merged token: row block window_index[j] goes to block j (HF
    `permute_input_for_window_attn`)."""
    blocks = reshape(g, rows, [-1, unit, width])  # [M, 4, width]
    return reshape(g, g.op("Gather", [blocks, window_index], axis=0), [-1, width])  # [T, width]


def inverse_permutation(g: GraphBuilder, perm: str) -> str:
    """argsort of a permutation: inverse[perm[i]] = i. int64 [M]."""
    n = g.op("Shape", [perm])  # [1] = M
    iota = g.op("Range", [g.const(0, "int64"), g.op("Squeeze", [n]), g.const(1, "int64")])  # [M]
    zeros = g.op("ConstantOfShape", [n], value=helper.make_tensor("zero", ELEM["int64"], [1], [0]))
    return g.op("ScatterElements", [zeros, perm, iota], axis=0)  # [M]


def vision_block(g, w, key, h, positions, cu_seqlens, spec: ModelSpec, inv_freq, axis) -> str:
    v = spec.vision
    with g.scope("attn"):
        n = rms_norm(g, w, h, f"{key}.norm1", NORM_EPS)
        h = g.op("Add", [h, attention(g, w, f"{key}.attn", n, positions, cu_seqlens, v, inv_freq, axis)])
    with g.scope("mlp"):
        n = rms_norm(g, w, h, f"{key}.norm2", NORM_EPS)
        h = g.op("Add", [h, gated_mlp(g, w, n, f"{key}.mlp", v.hidden_act, bias=True)])  # [T, Cv]
    return h


def merger(g, w, key, h, spec: ModelSpec) -> str:
    """ln_q (RMSNorm per patch) -> 2x2 shuffle -> mlp.0 -> GELU(erf, nn.GELU) -> mlp.2; [T, Cv] -> [M, C]."""
    wide = spec.vision.hidden_size * spec.vision.merge_unit
    n = reshape(g, rms_norm(g, w, h, f"{key}.ln_q", NORM_EPS), [-1, wide])  # [M, 4Cv]
    m = g.op("Gelu", [linear(g, w, n, f"{key}.mlp.0", True)])
    return linear(g, w, m, f"{key}.mlp.2", True)  # [M, C]
