"""MRoPE plugin enqueue vs HF's rotary functions (fp32 math from the same low-precision inputs) on the GPU."""
from __future__ import annotations

import pytest
import torch
from plugin_harness import assert_close, harness
from transformers.models.qwen3_vl import configuration_qwen3_vl as c3, modeling_qwen3_vl as m3

from qwen_vl_trt.export import plugin_ops as po

pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _run(x, pos, inv_freq, axis):
    y = torch.empty_like(x)
    harness().run("MRoPE", {"inv_freq": inv_freq, "axis": axis.astype("int32")}, [x, pos], [y])
    return y


def _reference(x, pos, inv_freq, axis):
    """rotate-half rotary in fp32: angle = positions[..., axis] * inv_freq (HF's product, HF's formula)."""
    ang = pos[..., torch.from_numpy(axis).long().cuda()].float() * torch.from_numpy(inv_freq).cuda()
    emb = torch.cat([ang, ang], -1).unsqueeze(-2)
    x32 = x.float()
    return x32 * emb.cos() + m3.rotate_half(x32) * emb.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 64, 72, 80, 128])
@pytest.mark.parametrize("n_tokens", [1, 1000, 16384])
def test_vision_rotary_matches_hf(dtype, head_dim, n_tokens):
    torch.manual_seed(head_dim + n_tokens)
    inv_freq, axis = po.rotary_tables_vision(head_dim)
    pos = torch.randint(0, 512, (n_tokens, 2), dtype=torch.int32, device="cuda")
    x = torch.randn(n_tokens, 16, head_dim, device="cuda").to(dtype)
    rope = m3.Qwen3VLVisionRotaryEmbedding(c3.Qwen3VLVisionConfig(hidden_size=16 * head_dim, num_heads=16)).cuda()
    cos, sin = rope(x, pos.long())
    ref, _ = m3.apply_rotary_pos_emb_vision(x.float(), x.float(), cos, sin)  # HF: fp32 math
    assert_close(_run(x, pos, inv_freq, axis), ref, dtype, "vision rotary")
    assert_close(_run(x, pos, inv_freq, axis), _reference(x, pos, inv_freq, axis), dtype, "table formula")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,section,interleaved", [(128, [24, 20, 20], True), (128, [16, 24, 24], False),
                                                          (32, [6, 5, 5], True)])
def test_text_mrope_4d_matches_hf_tables(dtype, head_dim, section, interleaved):
    torch.manual_seed(0)
    inv_freq, axis = po.mrope_tables_text(head_dim, 5e6, section, interleaved)
    B, S, H = 3, 257, 8
    pos = torch.randint(0, 100_000, (B, S, 3), dtype=torch.int32, device="cuda")  # large positions: sincos range
    x = torch.randn(B, S, H, head_dim, device="cuda").to(dtype)
    rope = m3.Qwen3VLTextRotaryEmbedding(c3.Qwen3VLTextConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": section,
                         "mrope_interleaved": True})).cuda()
    if interleaved:  # HF's own cos/sin (fp32 input so HF keeps them fp32)
        cos, sin = rope(x.float(), pos.permute(2, 0, 1).long())
        ref, _ = m3.apply_rotary_pos_emb(x.float(), x.float(), cos, sin, unsqueeze_dim=2)
    else:
        ref = _reference(x, pos, inv_freq, axis)
    assert_close(_run(x, pos, inv_freq, axis), ref, dtype, "text mrope")


def test_bad_axis_is_an_enqueue_error():
    inv_freq, axis = po.rotary_tables_vision(16)
    x = torch.randn(4, 2, 16, device="cuda", dtype=torch.float16)
    pos = torch.zeros(4, 1, dtype=torch.int32, device="cuda")  # A = 1 but the table uses axis 1
    with pytest.raises(AssertionError, match="enqueue failed"):
        _run(x, pos, inv_freq, axis)
