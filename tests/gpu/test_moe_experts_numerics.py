"""MoEExperts plugin enqueue (plugins/moeExperts) vs a torch fp32 reference of HF's routed experts on the GPU.

Reference: the stacked FP8 (e4m3) / INT4 experts dequantized by definition, W[e, k, n] = q[e, k, n] * s[e, k // B, n]
in fp32, then for each token t and choice j (a = t * top_k + j, e = ids[a]):
y[t] += weights[a] * (silu(x_t @ W_gu[e][:, :I]) * (x_t @ W_gu[e][:, I:])) @ W_down[e]   (HF Qwen3VLMoeTextExperts,
gate columns first). Inputs are the same low-precision tensors the kernel reads; the kernel accumulates in fp32 and
rounds once at the output, so the harness tolerances (plugin_harness.py) apply.
Unverified until a GPU session runs it (bench/gpu_visit.sh's `plugins` step collects this file).
"""
from __future__ import annotations

import pytest
import torch
from plugin_harness import Int4Tensor, assert_close, harness

pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
CASES = {  # id -> (tokens N, experts E, top_k, hidden C, intermediate I, gate_up block, down block)
    "decode_1": (1, 8, 2, 64, 48, 16, 16),
    "decode_7_e128": (7, 128, 8, 256, 96, 128, 32),
    "prefill_300": (300, 32, 4, 512, 256, 128, 64),
}


def _experts(kind: str, e: int, k: int, n: int, block: int, dtype, gen):
    """(plugin input, scale [E, ceil(K/B), N] in dtype, dequantized fp32 [E, K, N])."""
    kb = -(-k // block)
    if kind == "fp8":
        q = (torch.randn(e, k, n, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        s = (torch.rand(e, kb, n, generator=gen) * 5e-4 + 3e-4).to(dtype)
        stored, values = q.cuda(), q.float()
    else:
        q = torch.randint(-8, 8, (e, k, n), generator=gen, dtype=torch.int8)
        s = (torch.rand(e, kb, n, generator=gen) * 1e-2 + 5e-3).to(dtype)
        nib = (q.reshape(-1) & 0xF).to(torch.uint8)
        stored, values = Int4Tensor((nib[0::2] | (nib[1::2] << 4)).contiguous().cuda(), (e, k, n)), q.float()
    w = values * s.float().repeat_interleave(block, dim=1)[:, :k]
    return stored, s.cuda(), w.cuda()


def _routing(n_tok: int, e: int, top_k: int, dtype, gen):
    ids = torch.stack([torch.randperm(e, generator=gen)[:top_k] for _ in range(n_tok)]).reshape(-1)
    w = torch.rand(n_tok, top_k, generator=gen)
    return ids.to(torch.int32).cuda(), (w / w.sum(-1, keepdim=True)).reshape(-1).to(dtype).cuda()


def _reference(x, ids, weights, gate_up, down, top_k):
    i = down.shape[1]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for a in range(ids.numel()):
        t, e = a // top_k, int(ids[a])
        h = x[t].float() @ gate_up[e]
        y[t] += weights[a].float() * ((torch.nn.functional.silu(h[:i]) * h[i:]) @ down[e])
    return y


def _run(x, ids, weights, gu, gu_s, dn, dn_s, top_k, bg, bd):
    y = torch.empty_like(x)
    harness().run("MoEExperts", {"top_k": top_k, "gate_up_block_size": bg, "down_block_size": bd},
                  [x, ids, weights, gu, gu_s, dn, dn_s], [y])
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["fp8", "int4"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_moe_experts_match_reference(case, kind, dtype):
    n_tok, e, top_k, c, i, bg, bd = CASES[case]
    gen = torch.Generator().manual_seed(n_tok + e)
    gu, gu_s, gu_w = _experts(kind, e, c, 2 * i, bg, dtype, gen)
    dn, dn_s, dn_w = _experts(kind, e, i, c, bd, dtype, gen)
    x = torch.randn(n_tok, c, generator=gen).to(dtype).cuda()
    ids, weights = _routing(n_tok, e, top_k, dtype, gen)
    ref = _reference(x, ids, weights, gu_w, dn_w, top_k)
    assert ref.abs().max() > 0.05  # the case exercises the weights, not a near-zero output
    assert_close(_run(x, ids, weights, gu, gu_s, dn, dn_s, top_k, bg, bd), ref, dtype, f"{case} {kind}")


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_unselected_experts_are_never_read(kind):
    """NaN scales on every expert no token selected: the output stays finite and equal to the reference."""
    n_tok, e, top_k, c, i, bg, bd = CASES["decode_7_e128"]
    gen = torch.Generator().manual_seed(5)
    gu, gu_s, gu_w = _experts(kind, e, c, 2 * i, bg, torch.bfloat16, gen)
    dn, dn_s, dn_w = _experts(kind, e, i, c, bd, torch.bfloat16, gen)
    x = torch.randn(n_tok, c, generator=gen).to(torch.bfloat16).cuda()
    ids, weights = _routing(n_tok, e, top_k, torch.bfloat16, gen)
    unselected = torch.ones(e, dtype=torch.bool)
    unselected[ids.long().cpu()] = False
    gu_s[unselected.cuda()] = float("nan")
    dn_s[unselected.cuda()] = float("nan")
    y = _run(x, ids, weights, gu, gu_s, dn, dn_s, top_k, bg, bd)
    assert_close(y, _reference(x, ids, weights, gu_w, dn_w, top_k), torch.bfloat16, f"{kind} unselected NaN")
