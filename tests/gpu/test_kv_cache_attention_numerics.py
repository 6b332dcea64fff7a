"""KVCacheAttention plugin enqueue vs a concatenated-cache torch reference on the GPU (ragged past lengths).

Every test runs on both attention paths (`attention_kernel`: simt, mma). The MMA path takes prefill steps
(S >= 16) with fp16/bf16 and head dims 64/72/80/128 on sm_80+; decode (S < 16) always runs simt."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from plugin_harness import assert_close, attention_kernel, harness  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu


def _run(q, k, v, pk, pv, past, scale, in_place=True):
    o = torch.empty_like(q)
    present_k, present_v = (pk, pv) if in_place else (torch.full_like(pk, float("nan")), torch.full_like(pv, float("nan")))
    harness().run("KVCacheAttention", {"scale": float(scale)}, [q, k, v, pk, pv, past], [o, present_k, present_v])
    return o, present_k, present_v


def _reference(q, k, v, pk, pv, past, scale):
    """DynamicCache-style: concat the valid past rows with the new rows; causal GQA SDPA per sequence in fp32."""
    B, S = q.shape[:2]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b in range(B):
        p = int(past[b])
        kt = torch.cat([pk[b, :, :p], k[b].transpose(0, 1)], 1).float()
        vt = torch.cat([pv[b, :, :p], v[b].transpose(0, 1)], 1).float()
        mask = torch.arange(p + S, device=q.device)[None] <= (p + torch.arange(S, device=q.device))[:, None]
        o = F.scaled_dot_product_attention(q[b].transpose(0, 1)[None].float(), kt[None], vt[None], attn_mask=mask,
                                           scale=scale, enable_gqa=True)
        out[b] = o[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
@pytest.mark.parametrize("S,gqa", [(1, 1), (1, 4), (7, 2), (17, 8), (64, 4), (65, 1), (300, 2)])
@pytest.mark.parametrize("in_place", [True, False])
def test_step_matches_concat_cache(attention_kernel, dtype, head_dim, S, gqa, in_place):
    if attention_kernel == "mma" and (S < 16 or head_dim not in (64, 72, 80, 128)):
        pytest.skip("no MMA path for decode or this head dim: it runs the simt kernel (covered by the simt case)")
    torch.manual_seed(S + gqa + head_dim)
    B, hkv, C = 3, 2, 1024
    past = torch.tensor([0, 37, C - S - 5], dtype=torch.int32, device="cuda")
    q = torch.randn(B, S, hkv * gqa, head_dim, device="cuda").to(dtype)
    k, v = (torch.randn(B, S, hkv, head_dim, device="cuda").to(dtype) for _ in range(2))
    pk, pv = (torch.randn(B, hkv, C, head_dim, device="cuda").to(dtype) for _ in range(2))
    pk0, pv0 = pk.clone(), pv.clone()
    ref = _reference(q, k, v, pk0, pv0, past, head_dim ** -0.5)
    o, present_k, present_v = _run(q, k, v, pk, pv, past, head_dim ** -0.5, in_place)
    assert_close(o, ref, dtype, "attention output")
    for b, p in enumerate(past.tolist()):
        rows = torch.arange(C, device="cuda")
        new = (rows >= p) & (rows < p + S)
        assert torch.equal(present_k[b][:, new], k[b].transpose(0, 1)), "new key rows"
        assert torch.equal(present_v[b][:, new], v[b].transpose(0, 1)), "new value rows"
        assert torch.equal(present_k[b][:, ~new], pk0[b][:, ~new]), "rows outside [p, p+S) must not change"
        assert torch.equal(present_v[b][:, ~new], pv0[b][:, ~new])


def test_prefill_then_decode_equals_longer_prefill(attention_kernel):
    torch.manual_seed(11)
    B, H, hkv, D, C, S = 2, 8, 2, 128, 256, 40
    q, k, v = (torch.randn(B, S + 1, h, D, device="cuda", dtype=torch.bfloat16) for h in (H, hkv, hkv))
    zeros = lambda: torch.zeros(B, hkv, C, D, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    full, _, _ = _run(q, k, v, zeros(), zeros(), torch.zeros(B, dtype=torch.int32, device="cuda"), D ** -0.5)
    pk, pv = zeros(), zeros()
    _run(q[:, :S].contiguous(), k[:, :S].contiguous(), v[:, :S].contiguous(), pk, pv,
         torch.zeros(B, dtype=torch.int32, device="cuda"), D ** -0.5)
    step, _, _ = _run(q[:, S:].contiguous(), k[:, S:].contiguous(), v[:, S:].contiguous(), pk, pv,
                      torch.full((B,), S, dtype=torch.int32, device="cuda"), D ** -0.5)
    assert_close(step, full[:, S:], torch.bfloat16, "decode step vs prefill")
