"""VarlenAttention plugin enqueue vs per-segment torch SDPA in fp32 on the GPU (ragged, GQA, 1..16k tokens).

Every test runs on both attention paths (`attention_kernel`: simt, mma); the MMA path covers fp16/bf16 with head
dims 64/72/80/128 on sm_80+, so mma cases outside that set are skipped (they would rerun simt)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from plugin_harness import assert_close, attention_kernel, harness  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu


def _run(q, k, v, cu, scale, causal=0):
    o = torch.empty_like(q)
    harness().run("VarlenAttention", {"scale": float(scale), "causal": int(causal)}, [q, k, v, cu], [o])
    return o


def _reference(q, k, v, cu, scale, causal=0):
    """Each segment alone through SDPA (fp32, GQA by enable_gqa): an independent block-diagonal reference."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            qs, ks, vs = (t[a:b].float().transpose(0, 1)[None] for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, is_causal=bool(causal), enable_gqa=True)
            out[a:b] = o[0].transpose(0, 1)
    return out


def _skip_simt_only(kernel, head_dim, dtype=torch.float16):
    if kernel == "mma" and (head_dim not in (64, 72, 80, 128) or dtype == torch.float32):
        pytest.skip("no MMA path for this head dim / dtype: it runs the simt kernel (covered by the simt case)")


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


CASES = {
    "one": [1],
    "two": [17, 33],
    "ragged16": [1, 5, 64, 3, 100, 1, 31, 32, 33, 16, 2, 200, 7, 1, 48, 9],
    "empty_segment": [40, 0, 1, 25],
    "image_1k": [1024],
    "frames_4x1k": [1024] * 4,
    "long_16k": [16384],
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64, 72, 80, 128])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
def test_matches_sdpa(attention_kernel, dtype, head_dim, case, gqa):
    if case == "long_16k" and (gqa != 1 or head_dim not in (64, 128)):
        pytest.skip("16k tokens: one GQA ratio and two head dims keep the run short")
    _skip_simt_only(attention_kernel, head_dim)
    torch.manual_seed(head_dim * 7 + gqa)
    cu = _cu(CASES[case])
    T, hkv = int(cu[-1]), 16 // gqa
    q = torch.randn(T, 16, head_dim, device="cuda").to(dtype)
    k, v = (torch.randn(T, hkv, head_dim, device="cuda").to(dtype) for _ in range(2))
    scale = head_dim ** -0.5
    assert_close(_run(q, k, v, cu, scale), _reference(q, k, v, cu, scale), dtype, f"{case} D={head_dim} gqa={gqa}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 72, 80, 128])
@pytest.mark.parametrize("gqa", [1, 2, 8])
@pytest.mark.parametrize("causal", [0, 1])
def test_odd_segments_causal_and_not(attention_kernel, dtype, head_dim, gqa, causal):
    """Segment lengths that are not multiples of the 16-row (simt) or 64-row / 64-key (mma) tiles."""
    torch.manual_seed(head_dim + 3 * gqa + causal)
    cu = _cu([1, 15, 17, 63, 65, 1000])
    T, hkv = int(cu[-1]), 16 // gqa
    q = torch.randn(T, 16, head_dim, device="cuda").to(dtype)
    k, v = (torch.randn(T, hkv, head_dim, device="cuda").to(dtype) for _ in range(2))
    scale = head_dim ** -0.5
    assert_close(_run(q, k, v, cu, scale, causal), _reference(q, k, v, cu, scale, causal), dtype,
                 f"D={head_dim} gqa={gqa} causal={causal}")


def test_tokens_past_last_segment_are_zero(attention_kernel):
    torch.manual_seed(5)
    q, k, v = (torch.randn(100, 4, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    cu = _cu([40, 30])  # tokens 70..99 belong to no segment
    o = _run(q, k, v, cu, 0.125)
    assert torch.equal(o[70:], torch.zeros_like(o[70:])), "tokens past cu[n] must be zeros"
    assert_close(o[:70], _reference(q[:70], k[:70], v[:70], cu, 0.125)[:70], torch.float16, "segments")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_causal_and_fp32(attention_kernel, dtype):
    _skip_simt_only(attention_kernel, 64, dtype)
    torch.manual_seed(3)
    cu = _cu([5, 70, 1, 130])
    q, k, v = (torch.randn(int(cu[-1]), 4, 64, device="cuda").to(dtype) for _ in range(3))
    assert_close(_run(q, k, v, cu, 0.125, causal=1), _reference(q, k, v, cu, 0.125, causal=1), dtype, "causal")


def test_batch_invariance(attention_kernel):
    """A segment's output does not depend on which other segments are packed around it."""
    torch.manual_seed(4)
    seg = [torch.randn(77, 8, 80, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    alone = _run(seg[0], seg[1][:, :4].contiguous(), seg[2][:, :4].contiguous(), _cu([77]), 0.1)
    filler = torch.randn(21, 8, 80, device="cuda", dtype=torch.bfloat16)
    q = torch.cat([filler, seg[0]])
    k, v = (torch.cat([filler[:, :4], s[:, :4]]).contiguous() for s in seg[1:])
    packed = _run(q, k, v, _cu([21, 77]), 0.1)[21:]
    assert_close(packed, alone, torch.bfloat16, "packed vs alone")
