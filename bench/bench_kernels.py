"""Kernel benchmarks of libqwen_vl_plugins.so on the GPU (a script; not collected by pytest).

  python bench/bench_kernels.py [--tokens 4096 8192 16384] [--head-dim 64 72 80 128] [--dtype bf16]
                                [--kernel simt mma]

VarlenAttention: TFLOP/s (4*T_seg^2*H*D per segment, non-causal) vs torch SDPA with the flash backend on the
same segments laid out as a batch of equal segments, measured in the same run; ratio = ours / flash. One row
per attention path (--kernel: simt = CUDA cores, mma = tensor cores; mma runs simt where it does not apply).
MRoPE: GB/s (read x + positions, write y) vs a device-to-device copy of x of the same size in the same run.
Enqueue goes through tests/gpu/plugin_harness.py (plugin creation per call is host-side and overlaps).
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gpu"))
from plugin_harness import harness  # noqa: E402

from qwen_vl_trt.export import plugin_ops as po  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench_varlen(tokens: int, head_dim: int, dtype, kernel: str, heads: int = 16, seg_len: int = 1024) -> str:
    n_seg = max(1, tokens // seg_len)
    seg = tokens // n_seg
    T = n_seg * seg
    q, k, v = (torch.randn(T, heads, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    cu = torch.arange(0, T + 1, seg, dtype=torch.int32, device="cuda")
    o = torch.empty_like(q)
    h = harness()
    h.set_attention_kernel(kernel)
    ours = time_ms(lambda: h.run("VarlenAttention", {"scale": head_dim ** -0.5, "causal": 0}, [q, k, v, cu], [o],
                                 sync=False))
    qb, kb, vb = (t.view(n_seg, seg, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # [n, H, L, D]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        try:
            ref = time_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb))
        except RuntimeError:  # flash has no kernel for this head dim (e.g. 72 on some builds)
            ref = float("nan")
    flops = 4.0 * n_seg * seg * seg * heads * head_dim
    t_ours, t_ref = flops / ours / 1e9, flops / ref / 1e9
    return (f"VarlenAttention [{kernel}] T={T} segs={n_seg}x{seg} H={heads} D={head_dim} {str(dtype)[6:]}: "
            f"{ours:.3f} ms {t_ours:.1f} TFLOP/s | SDPA flash {ref:.3f} ms {t_ref:.1f} TFLOP/s | "
            f"ratio {t_ours / t_ref:.2f}")


def bench_mrope(tokens: int, head_dim: int, dtype, heads: int = 16) -> str:
    inv_freq, axis = po.rotary_tables_vision(head_dim)
    x = torch.randn(tokens, heads, head_dim, device="cuda", dtype=dtype)
    pos = torch.randint(0, 1024, (tokens, 2), dtype=torch.int32, device="cuda")
    y = torch.empty_like(x)
    h = harness()
    ours = time_ms(lambda: h.run("MRoPE", {"inv_freq": inv_freq, "axis": axis.astype("int32")}, [x, pos], [y],
                                 sync=False), iters=100)
    copy = time_ms(lambda: y.copy_(x), iters=100)
    moved = 2 * x.numel() * x.element_size() + pos.numel() * 4
    return (f"MRoPE T={tokens} H={heads} D={head_dim} {str(dtype)[6:]}: {ours * 1e3:.1f} us {moved / ours / 1e6:.0f} GB/s"
            f" | D2D copy {copy * 1e3:.1f} us {2 * x.numel() * x.element_size() / copy / 1e6:.0f} GB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 72, 80, 128])
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--kernel", choices=["simt", "mma"], nargs="+", default=["simt", "mma"],
                    help="attention paths to measure (qwen_vl_set_attention_kernel)")
    args = ap.parse_args()
    print("command:", " ".join(sys.argv))
    print("machine:", torch.cuda.get_device_name(), "| torch", torch.__version__, "|", platform.node())
    for d in args.head_dim:
        for t in args.tokens:
            for kernel in args.kernel:
                print(bench_varlen(t, d, DTYPES[args.dtype], kernel))
            print(bench_mrope(t, d, DTYPES[args.dtype]))


if __name__ == "__main__":
    main()
