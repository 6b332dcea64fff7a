"""Graph 3, `decoder.onnx`: one step of the text model (prefill: seq > 1, decode: seq == 1) with an explicit
fixed-capacity KV cache.

Per layer: RMSNorm -> q/k/v proj (+bias for Qwen2.5-VL) -> per-head q/k RMSNorm (Qwen3-VL) -> MRoPE
(interleaved for Qwen3-VL, chunked for Qwen2.5-VL) -> write K/V at rows past_lengths[b]..+seq-1 of the
cache -> causal GQA attention over the cache -> o_proj -> residual -> RMSNorm -> SwiGLU MLP (or the sparse
MoE block) -> residual -> + DeepStack level i after layer i (Qwen3-VL, HF `_deepstack_process`).
Final RMSNorm, then lm_head on the row `logits_index[b]` of each sequence only.

Sequences of one batch may have different lengths: right-pad them, give each its own past_lengths and
logits_index. Padded rows write garbage into cache rows that the next step overwrites and never attend
beyond their own row, so they do not disturb valid tokens. The runtime keeps past_lengths[b] + seq <= cache_len.

| I/O | name | dtype | shape | meaning |
|---|---|---|---|---|
| in | `inputs_embeds` | DT | [batch, seq, C] | from embed.onnx |
| in | `deepstack_embeds` | DT | [Ld, batch, seq, C] | added after decoder layers 0..Ld-1 (Qwen3-VL only) |
| in | `position_ids` | int64 | [3, batch, seq] | MRoPE positions (t, h, w) per token |
| in | `past_lengths` | int64 | [batch] | tokens already in the cache per sequence |
| in | `logits_index` | int64 | [batch] | position in seq whose logits are returned (last valid) |
| in | `past_key.{i}` | DT | [batch, Hkv, cache_len, D] | layer i key cache (i < L) |
| in | `past_value.{i}` | DT | [batch, Hkv, cache_len, D] | layer i value cache |
| out | `logits` | float32 | [batch, V] | next-token logits |
| out | `present_key.{i}` | DT | [batch, Hkv, cache_len, D] | key cache with rows past_lengths..past_lengths+seq-1 written |
| out | `present_value.{i}` | DT | [batch, Hkv, cache_len, D] | value cache, same rows |
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import ops
from qwen_vl_trt.model.contracts import decoder_contract
from . import fp8, int4, int8
from .layers import cast, gated_mlp, linear, reshape, rms_norm
from .onnx_graph import GraphBuilder
from .rotary import text_tables
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.weight_formats import METADATA_KEY, WeightFormats
from .tp import RankWeights, TensorParallel, all_reduce, gather_vocab, rank_spec
from .weights import CheckpointWeights


def export_decoder(spec: ModelSpec, weights: CheckpointWeights, out_dir: Path, dtype: str,
                   formats: WeightFormats = WeightFormats(), tp: TensorParallel | None = None) -> Path:
    """`formats`: the format of each group of weights (model/weight_formats.py), recorded as JSON in the graph's
    metadata under `qwen_vl.weights`. `tp`: write rank tp.rank's graph `decoder.rank{r}.onnx` of tp.size ranks
    (export/tp.py); None or size 1: decoder.onnx."""
    full_spec = spec
    if tp is not None and tp.active:
        weights, spec = RankWeights(weights, tp, spec), rank_spec(spec, tp)
    contract = decoder_contract(spec).resolve(dtype)
    if tp is not None and tp.active:
        contract = dataclasses.replace(contract, name=f"decoder.rank{tp.rank}")
    g, x, path = GraphBuilder.for_contract(contract, out_dir, dtype)
    g.formats = formats
    g.tp = tp
    t = spec.text
    pre = spec.weight_prefixes["text"]
    inv_freq, axis = text_tables(t.head_dim, t.rope_theta, t.mrope_section, t.mrope_interleaved)

    with g.scope("text"):
        positions = g.op("Transpose", [x["position_ids"]], perm=[1, 2, 0])  # [B, S, 3]
        h = x["inputs_embeds"]
        for i in range(t.num_hidden_layers):
            with g.scope(f"layers.{i}"):
                h, pk, pv = decoder_layer(g, weights, f"{pre}layers.{i}", h, x, i, positions, spec, inv_freq, axis)
                if i < spec.num_deepstack:
                    level = g.op("Gather", [x["deepstack_embeds"], g.const(i, "int64")], axis=0)  # [B, S, C]
                    h = g.op("Add", [h, level])
            g.output(pk, f"present_key.{i}", dtype, contract.output(f"present_key.{i}").dims)
            g.output(pv, f"present_value.{i}", dtype, contract.output(f"present_value.{i}").dims)
        h = rms_norm(g, weights, h, f"{pre}norm", t.rms_norm_eps)
        with g.scope("lm_head"):
            logits = gather_vocab(g, lm_head(g, weights, h, x["logits_index"], spec), full_spec.text.vocab_size)
            g.output(logits, "logits", "float32",
                     contract.output("logits").dims)
    g.finish(path, doc=__doc__, output_order=[t.name for t in contract.outputs],
             metadata={METADATA_KEY: json.dumps(formats.to_json())})
    return path


def decoder_layer(g, w, key, h, x, i, positions, spec: ModelSpec, inv_freq, axis):
    t = spec.text
    with g.scope("self_attn"):
        n = rms_norm(g, w, h, f"{key}.input_layernorm", t.rms_norm_eps)
        q = reshape(g, linear(g, w, n, f"{key}.self_attn.q_proj", t.attention_bias), [0, 0, -1, t.head_dim])
        k = reshape(g, linear(g, w, n, f"{key}.self_attn.k_proj", t.attention_bias), [0, 0, -1, t.head_dim])
        v = reshape(g, linear(g, w, n, f"{key}.self_attn.v_proj", t.attention_bias), [0, 0, -1, t.head_dim])
        if t.qk_norm:  # per-head RMSNorm over D, before RoPE (Qwen3)
            q = rms_norm(g, w, q, f"{key}.self_attn.q_norm", t.rms_norm_eps)
            k = rms_norm(g, w, k, f"{key}.self_attn.k_norm", t.rms_norm_eps)
        q = ops.mrope(g, q, positions, inv_freq, axis)  # [B, S, Hq, D]
        k = ops.mrope(g, k, positions, inv_freq, axis)  # [B, S, Hkv, D]
        o, pk, pv = ops.kv_cache_attention(g, q, k, v, x[f"past_key.{i}"], x[f"past_value.{i}"], x["past_lengths"],
                                           t.head_dim**-0.5, t.num_key_value_heads, t.head_dim)
        o = linear(g, w, reshape(g, o, [0, 0, -1]), f"{key}.self_attn.o_proj", False)  # [B, S, C]
        h = g.op("Add", [h, all_reduce(g, o)])  # the ranks' partial o_proj sums (export/tp.py; none at 1 rank)
    with g.scope("mlp"):
        n = rms_norm(g, w, h, f"{key}.post_attention_layernorm", t.rms_norm_eps)
        h = g.op("Add", [h, all_reduce(g, mlp(g, w, n, f"{key}.mlp", spec, i))])
    return h, pk, pv


def mlp(g, w, n, key, spec: ModelSpec, layer: int) -> str:
    moe = spec.text.moe
    if moe is not None and moe.is_sparse(layer):
        from .moe import sparse_moe_block

        return sparse_moe_block(g, w, n, key, spec)
    return gated_mlp(g, w, n, key, spec.text.hidden_act, bias=False)


def lm_head(g, w, h, logits_index, spec: ModelSpec) -> str:
    """Select row logits_index[b] of each sequence, then logits = h @ E^T in the compute dtype, cast to fp32.
    E [V, C] is lm_head's weight, or the embedding table when tied. `g.formats.lm_head`: dense (Gemm transB, no
    transposed copy), or E^T [C, V] as DequantizeLinear of INT4 blocks along C (export/int4.py; ONNX Runtime
    fuses it into MatMulNBits), INT8 per vocabulary row (export/int8.py) or FP8 blocks (export/fp8.py) -> MatMul."""
    c = spec.text.hidden_size
    idx = g.op("Expand", [reshape(g, logits_index, [-1, 1, 1]), g.op("Concat", [
        g.op("Shape", [logits_index]), g.const([1, c], "int64")], axis=0)])  # [B, 1, C]
    last = reshape(g, g.op("GatherElements", [h, idx], axis=1), [-1, c])  # [B, C]
    if spec.text.tie_word_embeddings:
        key = f"{spec.weight_prefixes['text']}embed_tokens.weight"
    else:
        key = w.resolve(f"{spec.weight_prefixes['lm_head']}weight", "lm_head.weight")
    fmt = g.formats.lm_head
    et = fp8.fp8_matmul_weight(g, w, key, f"{key}_t") if fmt == "fp8" else None  # [C, V]
    if et is None and fmt in ("int4", "int8"):
        table_t = w.get(key).t()  # [C, V]
        if fmt == "int8":
            et = int8.int8_matmul_weight(g, f"{key}_t", table_t)
        elif c % g.formats.int4_block == 0:
            et = int4.int4_matmul_weight(g, f"{key}_t", table_t, g.formats.int4_block)
    if et is not None:
        logits = g.op("MatMul", [last, et])  # [B, V]
    else:
        table = g.weight(f"{key}", w.get(key))  # [V, C]; Gemm transB avoids a transposed copy
        logits = g.op("Gemm", [last, table], transB=1)  # [B, V]
    return cast(g, logits, "float32") if g.dtype != "float32" else logits
