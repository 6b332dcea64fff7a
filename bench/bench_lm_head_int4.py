"""INT4 lm_head on ONNX Runtime's CPU provider: per-step time and error of block 32 vs 128, accuracy level 1 vs 4
(a script: which default `--int4-block-size` to ship for `--weights int4`).

  python bench/bench_lm_head_int4.py [--hidden 2048] [--vocab 151936] [--batch 1] [--threads 2] [--repeat 20]

The lm_head of a 2B-shaped model (x [B, C] @ E^T, E [V, C]) written as export/decoder.py writes it: fp32 graph,
`DequantizeLinear(int4 [C, V], s [C/B, V], axis 0, block B) -> MatMul` (export/int4.py), which ONNX Runtime fuses into
MatMulNBits at the session's `session.qdq_matmulnbits_accuracy_level` (1: fp32 activations, 4: int8 activations;
runtime/backends/ort.py). The dense fp32 Gemm is the baseline. Weights: N(0, 0.02) (random: they say nothing about
a real model's outliers; the error column compares block sizes on the same weights only), activations N(0, 1).
Columns: median ms per call, weight bytes, max |logit error| and RMS logit error relative to the RMS logit, both vs
the dense product in float64.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import machine, median_ms, utc_now  # noqa: E402


def lm_head_graph(out: Path, table_t: np.ndarray, block: int | None) -> Path:
    """out/lm_head.onnx: y [B, V] = x [B, C] @ table_t [C, V], dense (block None) or INT4 blocks (export/int4.py)."""
    import torch

    from qwen_vl_trt.export.int4 import int4_matmul_weight
    from qwen_vl_trt.export.onnx_graph import GraphBuilder

    c, v = table_t.shape
    path = out / f"lm_head_{block or 'dense'}.onnx"
    g = GraphBuilder("lm_head", path.with_name(path.name + ".data"), "float32")
    x = g.input("x", "float32", ["batch", c])
    w = torch.from_numpy(table_t)
    wt = int4_matmul_weight(g, "lm_head_t", w, block) if block else g.weight("lm_head_t", w)
    g.output(g.op("MatMul", [x, wt]), "logits", "float32", ["batch", v])
    g.finish(path)
    return path


def session(path: Path, level: int, threads: int):
    import onnxruntime as ort

    from qwen_vl_trt.runtime.backends.ort import int4_accuracy

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    int4_accuracy(opts, level)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 128])
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    table_t = (rng.standard_normal((args.hidden, args.vocab), np.float32) * np.float32(0.02))
    x = rng.standard_normal((args.batch, args.hidden), np.float32)
    ref = x.astype(np.float64) @ table_t.astype(np.float64)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qwen-vl-lmhead-") as tmp:
        for block in [None, *args.blocks]:
            t0 = time.perf_counter()
            path = lm_head_graph(Path(tmp), table_t, block)
            nbytes = path.with_name(path.name + ".data").stat().st_size
            for level in ([1] if block is None else [1, 4]):
                sess = session(path, level, args.threads)
                y = sess.run(None, {"x": x})[0]
                ms = median_ms(lambda: sess.run(None, {"x": x}), repeat=args.repeat)
                err = float(np.abs(y - ref).max())
                rel = float(np.sqrt(np.mean((y - ref) ** 2) / np.mean(ref ** 2)))
                rows.append((block, level, ms, nbytes, err, rel))
                del sess
            print(f"block {block}: built and timed in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"# INT4 lm_head, ONNX Runtime CPU -- {utc_now()}")
    print(f"machine: {machine()}; {args.threads} threads; x [{args.batch}, {args.hidden}] @ [{args.hidden}, "
          f"{args.vocab}], fp32 graph, random N(0, 0.02) weights")
    print(f"command: python bench/bench_lm_head_int4.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print("| lm_head | accuracy level | ms per step (median) | weight MB | max abs logit error | RMS error / RMS logit |")
    print("|---|---|---|---|---|---|")
    for block, level, ms, nbytes, err, rel in rows:
        name = "dense fp32 MatMul" if block is None else f"INT4 block {block} (MatMulNBits)"
        lvl = "-" if block is None else f"{level} ({'fp32' if level == 1 else 'int8'} activations)"
        print(f"| {name} | {lvl} | {ms:.2f} | {nbytes / 1e6:.1f} | {err:.2e} | {rel:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
