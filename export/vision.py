"""Graph 1, `vision.onnx`: Qwen3-VL vision encoder + patch merger + DeepStack mergers.

PatchEmbed (Conv3d with kernel == stride, i.e. one MatMul over the flattened patch row) -> + learned
position embedding resampled bilinearly (4 taps per patch, computed on the host) -> 2-D RoPE -> blocks
(LayerNorm, fused qkv, attention within each segment of cu_seqlens, MLP) -> DeepStack mergers after the
blocks listed in deepstack_visual_indexes -> final merger (LayerNorm per patch, 2x2 shuffle, MLP).
Any number of images and video frames in one call: each image / temporal patch is one attention segment.

| I/O | name | dtype | shape | meaning |
|---|---|---|---|---|
| in | `pixel_values` | float32 | [num_patches, 3*2*P*P] | flattened patches in HF order (merge-block major), rows (C, Tp, P, P) |
| in | `pos_embed_indices` | int64 | [num_patches, 4] | bilinear taps into the learned position table, merge-block order |
| in | `pos_embed_weights` | float32 | [num_patches, 4] | bilinear tap weights |
| in | `rotary_pos_ids` | int64 | [num_patches, 2] | (row, col) of each patch for 2-D RoPE |
| in | `cu_seqlens` | int32 | [num_frames_1] | cumulative patch counts: one attention segment per image / temporal patch |
| out | `vision_features` | DT | [num_merged, C] | merged features, one row per pad token |
| out | `deepstack_features` | DT | [Ld, num_merged, C] | DeepStack merger outputs, one level per deepstack_visual_indexes entry |

The host-side inputs are computed by `qwen_vl_trt.runtime.vision_inputs` (numpy ports of
transformers.vision_utils). Qwen2.5-VL (window attention, no DeepStack) lives in `vision_qwen2_5.py`.
"""
from __future__ import annotations

from pathlib import Path

from . import ops
from qwen_vl_trt.model.contracts import vision_contract
from .layers import activation, layer_norm, linear, reshape, to_compute
from .onnx_graph import GraphBuilder
from .rotary import vision_tables
from qwen_vl_trt.model.spec import ModelSpec
from .weights import CheckpointWeights


def export_vision(spec: ModelSpec, weights: CheckpointWeights, out_dir: Path, dtype: str) -> Path:
    contract = vision_contract(spec).resolve(dtype)
    g, x, path = GraphBuilder.for_contract(contract, out_dir, dtype)
    v = spec.vision
    pre = spec.weight_prefixes["visual"]

    with g.scope("visual"):
        h = patch_embed(g, weights, pre, x["pixel_values"], v.hidden_size)
        h = g.op("Add", [h, to_compute(g, position_embedding(g, weights, pre, x))])  # [T, Cv]
        inv_freq, axis = vision_tables(v.head_dim, v.rope_theta)
        deepstack = []
        for i in range(v.depth):
            with g.scope(f"blocks.{i}"):
                h = vision_block(g, weights, f"{pre}blocks.{i}", h, x, spec, inv_freq, axis)
            if i in v.deepstack_visual_indexes:
                level = v.deepstack_visual_indexes.index(i)
                with g.scope(f"deepstack_merger_list.{level}"):
                    deepstack.append(merger(g, weights, f"{pre}deepstack_merger_list.{level}", h, spec, True))
        with g.scope("merger"):
            merged = merger(g, weights, f"{pre}merger", h, spec, False)

    out = contract.outputs
    g.output(merged, out[0].name, out[0].dtype, out[0].dims)
    if deepstack:
        stacked = g.op("Concat", [g.op("Unsqueeze", [d, g.const([0])]) for d in deepstack], axis=0)
        g.output(stacked, out[1].name, out[1].dtype, out[1].dims)
    g.finish(path, doc=__doc__, output_order=[t.name for t in contract.outputs])
    return path


def patch_embed(g: GraphBuilder, w: CheckpointWeights, pre: str, pixels: str, hidden: int) -> str:
    """Conv3d(kernel=stride=(Tp,P,P)) on rows (C,Tp,P,P) == rows @ W.reshape(Cv, -1)^T + b."""
    with g.scope("patch_embed"):
        conv_w = w.get(f"{pre}patch_embed.proj.weight")  # [Cv, C, Tp, P, P]
        x = to_compute(g, pixels)  # HF casts pixel_values to the weight dtype
        key = f"{pre}patch_embed.proj"
        bias = w.has(f"{key}.bias")  # Qwen3-VL has a bias, Qwen2.5-VL none
        return linear(g, w, x, key, bias, weight=conv_w.reshape(hidden, -1))  # [T, Cv]


def position_embedding(g: GraphBuilder, w: CheckpointWeights, pre: str, x: dict) -> str:
    """sum_k table[idx[:, k]] * weight[:, k] in fp32 (HF multiplies by fp32 weights, then casts)."""
    with g.scope("pos_embed"):
        table = g.weight(f"{pre}pos_embed.weight", w.get(f"{pre}pos_embed.weight"), "float32")
        taps = g.op("Gather", [table, x["pos_embed_indices"]], axis=0)  # [T, 4, Cv]
        wts = g.op("Unsqueeze", [x["pos_embed_weights"], g.const([-1])])  # [T, 4, 1]
        return g.op("ReduceSum", [g.op("Mul", [taps, wts]), g.const([1])], keepdims=0)  # [T, Cv]


def vision_block(g, w, key, h, x, spec: ModelSpec, inv_freq, axis) -> str:
    v = spec.vision
    with g.scope("attn"):
        n = layer_norm(g, w, h, f"{key}.norm1", 1e-6)
        o = attention(g, w, f"{key}.attn", n, x["rotary_pos_ids"], x["cu_seqlens"], v, inv_freq, axis)
        h = g.op("Add", [h, o])
    with g.scope("mlp"):
        n = layer_norm(g, w, h, f"{key}.norm2", 1e-6)
        m = activation(g, linear(g, w, n, f"{key}.mlp.linear_fc1", True), v.hidden_act)
        h = g.op("Add", [h, linear(g, w, m, f"{key}.mlp.linear_fc2", True)])
    return h


def attention(g, w, key, n, positions, cu_seqlens, v, inv_freq, axis) -> str:
    """Fused qkv (bias) -> 2-D RoPE -> attention within each cu_seqlens segment -> proj (bias); [T, Cv]."""
    qkv = linear(g, w, n, f"{key}.qkv", True)  # [T, 3*Cv]
    qkv = reshape(g, qkv, [0, 3, v.num_heads, v.head_dim])  # [T, 3, H, D]
    q, k, val = g.op("Split", [qkv], n_out=3, axis=1, num_outputs=3)
    q, k, val = (g.op("Squeeze", [t, g.const([1])]) for t in (q, k, val))  # [T, H, D]
    q = ops.mrope(g, q, positions, inv_freq, axis)
    k = ops.mrope(g, k, positions, inv_freq, axis)
    o = ops.varlen_attention(g, q, k, val, cu_seqlens, v.head_dim**-0.5)  # [T, H, D]
    return linear(g, w, reshape(g, o, [0, -1]), f"{key}.proj", True)  # [T, Cv]


def merger(g, w, key, h, spec: ModelSpec, postshuffle_norm: bool) -> str:
    """LayerNorm (before or after the 2x2 shuffle) -> Linear -> GELU(erf) -> Linear; [T, Cv] -> [M, C]."""
    wide = spec.vision.hidden_size * spec.vision.merge_unit
    if postshuffle_norm:
        n = layer_norm(g, w, reshape(g, h, [-1, wide]), f"{key}.norm", 1e-6)  # [M, 4Cv]
    else:
        n = reshape(g, layer_norm(g, w, h, f"{key}.norm", 1e-6), [-1, wide])  # [M, 4Cv]
    m = g.op("Gelu", [linear(g, w, n, f"{key}.linear_fc1", True)])
    return linear(g, w, m, f"{key}.linear_fc2", True)  # [M, C]
