"""The reference bodies of the qwen_vl plugin ops (export/plugin_ops.py), run by ONNX Runtime CPU, against
independent torch references: HF's rotary functions, SDPA with a block-diagonal / causal mask, torch.cat cache.

fp32 tolerance 1e-5 (absolute; inputs ~N(0,1), outputs O(1)): both sides compute in fp32 with the same
angles (one fp32 product) and differ only in cos/sin/exp implementations (<= 2 ulp) and summation order over
<= 64 terms, i.e. ~1e-6 at most; 1e-5 leaves room for that and nothing else (an index or mask error is O(1)).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from transformers.models.qwen2_5_vl import configuration_qwen2_5_vl as c25, modeling_qwen2_5_vl as m25
from transformers.models.qwen3_vl import configuration_qwen3_vl as c3, modeling_qwen3_vl as m3

from qwen_vl_trt.export import plugin_ops as po

FP32_ATOL = 1e-5
ONNX_ELEM = {np.float32: TensorProto.FLOAT, np.int32: TensorProto.INT32}
LOW = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


def run_node(node: onnx.NodeProto, feeds: dict, n_out: int = 1, low: str | None = None):
    """Run one plugin node through its function body in ORT. With `low`, float inputs are cast to fp16/bf16
    inside the graph and the outputs cast back to fp32 (numpy has no bf16)."""
    nodes, inputs = [], []
    renamed = {}
    for name, arr in feeds.items():
        inputs.append(helper.make_tensor_value_info(name, ONNX_ELEM[arr.dtype.type], list(arr.shape)))
        if low and arr.dtype == np.float32:
            renamed[name] = f"{name}_low"
            nodes.append(helper.make_node("Cast", [name], [renamed[name]], to=LOW[low]))
    node = onnx.NodeProto.FromString(node.SerializeToString())
    node.input[:] = [renamed.get(i, i) for i in node.input]
    outs = list(node.output)
    if low:
        node.output[:] = [f"{o}_low" for o in outs]
        nodes += [node] + [helper.make_node("Cast", [f"{o}_low"], [o], to=TensorProto.FLOAT) for o in outs]
    else:
        nodes.append(node)
    like = [list(feeds)[0]] + [list(feeds)[min(3, len(feeds) - 1)]] * (len(outs) - 1)  # o ~ first input; present ~ past_key
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT,
                                                                                 list(feeds[n].shape))
                                                   for o, n in zip(outs, like)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", po.OPSET)])
    model.ir_version = 10
    po.add_functions(model)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    res = sess.run(None, feeds)
    return res[0] if n_out == 1 else res


def assert_close(got, ref, atol, rtol=0.0):
    ref = np.asarray(ref, np.float32)
    err = np.abs(got - ref) - (atol + rtol * np.abs(ref))
    i = np.unravel_index(np.argmax(err), err.shape)
    assert err[i] <= 0, f"worst at {i}: got {got[i]} ref {ref[i]} (|d|={abs(got[i] - ref[i]):.3g})"


# ---- MRoPE --------------------------------------------------------------------------------------------
def _hf_text_rope(family: str, head_dim: int, theta: float, section):
    if family == "qwen3_vl":
        cfg = c3.Qwen3VLTextConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                                   rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                    "mrope_section": section, "mrope_interleaved": True})
        return m3.Qwen3VLTextRotaryEmbedding(cfg), m3.apply_rotary_pos_emb
    cfg = c25.Qwen2_5_VLTextConfig(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2,
                                   rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                    "mrope_section": section})
    return m25.Qwen2_5_VLRotaryEmbedding(cfg), m25.apply_rotary_pos_emb


@pytest.mark.parametrize("family,head_dim,theta,section", [
    ("qwen3_vl", 128, 5e6, [24, 20, 20]),   # Qwen3-VL release
    ("qwen3_vl", 32, 5e6, [6, 5, 5]),       # tiny test model
    ("qwen2_5_vl", 128, 1e6, [16, 24, 24]),  # Qwen2.5-VL release
    ("qwen2_5_vl", 32, 1e6, [4, 6, 6]),
])
def test_mrope_text_matches_hf(family, head_dim, theta, section):
    rope, apply = _hf_text_rope(family, head_dim, theta, section)
    inv_freq, axis = po.mrope_tables_text(head_dim, theta, section, interleaved=family == "qwen3_vl")
    assert np.array_equal(inv_freq, rope.inv_freq.numpy())  # bit-exact, so the angles are bit-exact
    rng = np.random.default_rng(0)
    B, S, H = 2, 7, 3
    pos = rng.integers(0, 5000, size=(3, B, S)).astype(np.int32)  # (t, h, w) differ, as for image tokens
    x = rng.standard_normal((B, S, H, head_dim)).astype(np.float32)
    cos, sin = rope(torch.zeros(1), torch.from_numpy(pos).long())
    ref, _ = apply(torch.from_numpy(x), torch.from_numpy(x), cos, sin, unsqueeze_dim=2)
    got = run_node(po.make_mrope_node("x", "positions", "y", inv_freq, axis),
                   {"x": x, "positions": np.ascontiguousarray(pos.transpose(1, 2, 0))})
    assert_close(got, ref.numpy(), FP32_ATOL)


@pytest.mark.parametrize("head_dim", [16, 64, 72, 80])
def test_mrope_vision_matches_hf(head_dim):
    cfg = c3.Qwen3VLVisionConfig(hidden_size=4 * head_dim, num_heads=4)
    rope = m3.Qwen3VLVisionRotaryEmbedding(cfg)
    inv_freq, axis = po.rotary_tables_vision(head_dim)
    assert np.array_equal(inv_freq[: head_dim // 4], rope.inv_freq.numpy())
    rng = np.random.default_rng(1)
    T, H = 23, 4
    pos = rng.integers(0, 96, size=(T, 2)).astype(np.int32)  # (h, w) per patch
    x = rng.standard_normal((T, H, head_dim)).astype(np.float32)
    cos, sin = rope(torch.zeros(1), torch.from_numpy(pos).long())
    ref, _ = m3.apply_rotary_pos_emb_vision(torch.from_numpy(x), torch.from_numpy(x), cos, sin)
    got = run_node(po.make_mrope_node("x", "positions", "y", inv_freq, axis), {"x": x, "positions": pos})
    assert_close(got, ref.numpy(), FP32_ATOL)


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_mrope_low_precision_is_fp32_math_then_cast(low):
    inv_freq, axis = po.mrope_tables_text(32, 5e6, [6, 5, 5], interleaved=True)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, 2, 32)).astype(np.float32)
    pos = rng.integers(0, 300, size=(9, 3)).astype(np.int32)
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[low]
    xl = torch.from_numpy(x).to(tdt).float()  # the graph's input after its cast to `low`
    ang = torch.from_numpy(pos[:, axis]).float() * torch.from_numpy(inv_freq)
    emb = torch.cat([ang, ang], -1)[:, None, :]
    ref = (xl * emb.cos() + m3.rotate_half(xl) * emb.sin()).to(tdt).float()
    got = run_node(po.make_mrope_node("x", "positions", "y", inv_freq, axis), {"x": x, "positions": pos}, low=low)
    eps = float(torch.finfo(tdt).eps)
    assert_close(got, ref.numpy(), atol=1e-6, rtol=eps)  # at most one rounding step apart


def test_text_tables_layout():
    _, axis = po.mrope_tables_text(128, 5e6, [24, 20, 20], interleaved=True)
    assert axis[:6].tolist() == [0, 1, 2, 0, 1, 2] and axis[60:].tolist() == [0, 0, 0, 0]  # past 3*20: all T
    assert (axis == 1).sum() == 20 and (axis == 2).sum() == 20
    _, axis = po.mrope_tables_text(128, 1e6, [16, 24, 24], interleaved=False)
    assert axis.tolist() == [0] * 16 + [1] * 24 + [2] * 24
    with pytest.raises(ValueError, match="summing to head_dim/2 = 64"):
        po.mrope_tables_text(128, 1e6, [16, 24, 20], interleaved=False)


# ---- VarlenAttention ----------------------------------------------------------------------------------
def _segments(rng, n_seg: int, max_len: int) -> np.ndarray:
    lengths = rng.integers(1, max_len + 1, size=n_seg)
    lengths[rng.integers(0, n_seg)] = 1  # always one length-1 segment
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _sdpa_varlen(q, k, v, cu, scale, causal):
    T = q.shape[0]
    seg = np.searchsorted(cu[1:], np.arange(T), side="right")
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= np.tril(np.ones((T, T), bool))
    qt, kt, vt = (torch.from_numpy(a).transpose(0, 1)[None] for a in (q, k, v))  # [1, H, T, D]
    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=torch.from_numpy(mask), scale=scale,
                                                         enable_gqa=True)
    return o[0].transpose(0, 1).numpy()


@pytest.mark.parametrize("n_seg,gqa,head_dim,causal", [
    (1, 1, 16, 0), (3, 2, 16, 0), (7, 4, 32, 0), (16, 1, 72, 0), (16, 2, 16, 0), (5, 2, 16, 1),
])
def test_varlen_attention_matches_sdpa(n_seg, gqa, head_dim, causal):
    rng = np.random.default_rng(n_seg * 10 + gqa)
    cu = _segments(rng, n_seg, 9)
    T, hkv = int(cu[-1]), 2
    q = rng.standard_normal((T, hkv * gqa, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((T, hkv, head_dim)).astype(np.float32) for _ in range(2))
    scale = head_dim ** -0.5
    got = run_node(po.make_varlen_attention_node("q", "k", "v", "cu_seqlens", "o", scale, causal=causal),
                   {"q": q, "k": k, "v": v, "cu_seqlens": cu})
    assert_close(got, _sdpa_varlen(q, k, v, cu, scale, causal), FP32_ATOL)


def test_varlen_attention_empty_segment_and_bf16():
    rng = np.random.default_rng(5)
    cu = np.array([0, 4, 4, 5, 11], np.int32)  # an empty segment and a length-1 segment
    q, k, v = (rng.standard_normal((11, 2, 16)).astype(np.float32) for _ in range(3))
    node = po.make_varlen_attention_node("q", "k", "v", "cu_seqlens", "o", 0.25)
    got = run_node(node, {"q": q, "k": k, "v": v, "cu_seqlens": cu})
    assert_close(got, _sdpa_varlen(q, k, v, cu, 0.25, 0), FP32_ATOL)
    got = run_node(node, {"q": q, "k": k, "v": v, "cu_seqlens": cu}, low="bfloat16")
    bf = lambda a: torch.from_numpy(a).bfloat16().float().numpy()  # noqa: E731
    ref = torch.from_numpy(_sdpa_varlen(bf(q), bf(k), bf(v), cu, 0.25, 0)).bfloat16().float().numpy()
    assert_close(got, ref, atol=1e-6, rtol=2 ** -8)


# ---- KVCacheAttention ---------------------------------------------------------------------------------
def _cache_reference(q, k, v, pk, pv, past, scale):
    """DynamicCache-style: concat the valid past rows with the new rows, then causal GQA attention."""
    B, S = q.shape[:2]
    out = np.zeros_like(q)
    present_k, present_v = pk.copy(), pv.copy()
    for b in range(B):
        p = int(past[b])
        kt = torch.cat([torch.from_numpy(pk[b, :, :p]), torch.from_numpy(k[b]).transpose(0, 1)], dim=1)  # [Hkv, p+S, D]
        vt = torch.cat([torch.from_numpy(pv[b, :, :p]), torch.from_numpy(v[b]).transpose(0, 1)], dim=1)
        present_k[b, :, p:p + S], present_v[b, :, p:p + S] = kt[:, p:].numpy(), vt[:, p:].numpy()
        mask = torch.arange(p + S)[None, :] <= (p + torch.arange(S))[:, None]  # [S, p+S]
        o = torch.nn.functional.scaled_dot_product_attention(torch.from_numpy(q[b]).transpose(0, 1)[None], kt[None],
                                                             vt[None], attn_mask=mask, scale=scale, enable_gqa=True)
        out[b] = o[0].transpose(0, 1).numpy()
    return out, present_k, present_v


@pytest.mark.parametrize("S,gqa,past", [(1, 1, [0, 5, 11]), (1, 4, [3, 0, 27]), (4, 2, [0, 7, 20]),
                                        (6, 4, [2, 13, 0]), (5, 1, [27, 0, 1])])
def test_kv_cache_attention_matches_concat_cache(S, gqa, past):
    rng = np.random.default_rng(S * 7 + gqa)
    B, hkv, C, D = 3, 2, 32, 32
    q = rng.standard_normal((B, S, hkv * gqa, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, hkv, D)).astype(np.float32) for _ in range(2))
    pk, pv = (rng.standard_normal((B, hkv, C, D)).astype(np.float32) for _ in range(2))
    past = np.array(past, np.int32)
    node = po.make_kv_cache_attention_node("q", "k", "v", "past_key", "past_value", "past_lengths", "o",
                                           "present_key", "present_value", D ** -0.5)
    got = run_node(node, {"q": q, "k": k, "v": v, "past_key": pk, "past_value": pv, "past_lengths": past}, n_out=3)
    ref = _cache_reference(q, k, v, pk, pv, past, D ** -0.5)
    assert_close(got[0], ref[0], FP32_ATOL)
    assert np.array_equal(got[1], ref[1]) and np.array_equal(got[2], ref[2])  # a copy: bit-exact


def test_kv_cache_attention_fp16_runs_in_ort():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 3, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 3, 2, 16)).astype(np.float32) for _ in range(2))
    pk, pv = (rng.standard_normal((2, 2, 8, 16)).astype(np.float32) for _ in range(2))
    past = np.array([0, 5], np.int32)
    node = po.make_kv_cache_attention_node("q", "k", "v", "past_key", "past_value", "past_lengths", "o",
                                           "present_key", "present_value", 0.25)
    feeds = {"q": q, "k": k, "v": v, "past_key": pk, "past_value": pv, "past_lengths": past}
    got = run_node(node, feeds, n_out=3, low="float16")
    h = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    ref = _cache_reference(h(q), h(k), h(v), h(pk), h(pv), past, 0.25)
    assert_close(got[0], h(ref[0]), atol=1e-6, rtol=2 ** -10)
    assert np.array_equal(got[1], ref[1])


# ---- nodes and functions -----------------------------------------------------------------------------
def test_nodes_carry_plugin_identity_and_functions_attach_once():
    node = po.make_varlen_attention_node("q", "k", "v", "cu", "o", 0.125, name="/vision/blocks.0/attn/VarlenAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "qwen_vl" and node.op_type == "VarlenAttention"
    assert attrs == {"plugin_namespace": b"qwen_vl", "plugin_version": b"1", "scale": 0.125, "causal": 0}
    model = helper.make_model(helper.make_graph([node], "g", [], []))
    po.add_functions(po.add_functions(model))
    assert [(f.domain, f.name) for f in model.functions] == [("qwen_vl", "VarlenAttention")]
    assert list(model.functions[0].attribute) == ["scale", "causal", "plugin_namespace", "plugin_version"]
    assert any(o.domain == "qwen_vl" for o in model.opset_import)


def test_bodies_use_only_tensorrt_parsable_ops():
    banned = {"NonZero", "ScatterND", "Loop", "Scan"}
    for op, make in po.FUNCTIONS.items():
        fn = make()
        assert fn.name == op and fn.domain == "qwen_vl"
        used = {n.op_type for n in fn.node}
        assert not used & banned, (op, used & banned)
        assert all(n.domain in ("", "ai.onnx") for n in fn.node)
