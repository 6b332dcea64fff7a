"""`--weights int4` vs dense decoder on ONNX Runtime, with HF as the reference, in one run (a script).

  python bench/bench_int4.py [--text-layers 8] [--prompt 256] [--tokens 32] [--batch 1 4] [--threads 2]
                             [--block 128] [--work DIR]

A random-weight Qwen3-VL checkpoint with Qwen3-VL-2B's layer shapes (bench_ort_graphs.make_checkpoint), exported
twice as fp32 graphs: dense and with the decoder's projections as INT4 blocks (export/int4.py); the INT4 graphs
run twice, with the default fp32 accumulation (HF-exact) and with `QWEN_VL_INT4_ACCURACY_LEVEL=4` (activations
rounded to int8 inside MatMulNBits, ONNX Runtime's fast CPU path). For each:
decoder weight bytes, prefill ms of a text prompt, decode tok/s per batch (greedy, `--tokens` new tokens),
on ONNX Runtime's fused graphs (`*.ort.onnx`); HF transformers (fp32, dense) decodes the same prompt in the same
process for the ratios. lm_head (tied to the 151936-row embedding table) is INT4 in the int4 graphs (embed.onnx keeps
the dense table, which a decode step only gathers a row of).
Random weights say nothing about INT4's accuracy; only speed and bytes are measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_ort_graphs import hf, make_checkpoint, ours, text_prompt  # noqa: E402
from benchlib import machine, utc_now  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256, help="text prompt tokens (about)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.work is None:  # two fp32 exports + a checkpoint: ~10 GB at 8 layers, removed at the end
        with tempfile.TemporaryDirectory(prefix="qwen-vl-int4-") as tmp:
            return run(args, Path(tmp), argv)
    return run(args, args.work, argv)


def run(args, work: Path, argv) -> int:
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits
    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.model.weight_formats import WeightFormats
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request

    t0 = time.perf_counter()
    ckpt = make_checkpoint(work, args.text_layers, 1)
    limits = Limits(max_patches=1024, max_batch=max(args.batch), max_seq=args.prompt + 64,
                    max_cache_len=args.prompt + 64 + args.tokens + 16)
    int4 = WeightFormats.parse("int4", int4_block=args.block)
    arts = {"dense": export_all(ckpt, work / "dense", "fp32", limits).parent,
            "int4": export_all(ckpt, work / "int4", "fp32", limits, formats=int4).parent}
    print(f"checkpoint + two fp32 exports: {time.perf_counter() - t0:.0f} s ({work})", file=sys.stderr)
    prompt = text_prompt(args.prompt)
    runs = {k: ours(a, True, {}, prompt, args.tokens, args.batch, args.threads) for k, a in arts.items()}
    # int8 activations: ONNX Runtime's fast CPU path, not HF-exact
    runs["int4 a8"] = ours(arts["int4"], True, {}, prompt, args.tokens, args.batch, args.threads, "int8")
    ids = Preprocessor(load_manifest(arts["dense"])).prepare(Request(prompt)).input_ids.tolist()
    ref = hf(ckpt, {}, ids, args.tokens, args.batch, args.threads)

    print(f"# INT4 weight-only decoder vs dense, ONNX Runtime, HF as reference -- {utc_now()}")
    print(f"machine: {machine()}; provider {runs['dense']['provider']}, {args.threads} threads; Qwen3-VL-2B shapes, "
          f"{args.text_layers} text layers, fp32 graphs, INT4 blocks of {args.block}, random weights")
    print(f"command: python bench/bench_int4.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print("| measurement | dense | int4 (fp32 accumulation, default) | int4, int8 activations | HF (dense) "
          "| int4 / dense | int4 a8 / dense | int4 / HF |")
    print("|---|---|---|---|---|---|---|---|")
    gib = {k: (a / "decoder.onnx.data").stat().st_size / 2**30 for k, a in arts.items()}
    print(f"| decoder weights, GiB | {gib['dense']:.2f} | {gib['int4']:.2f} | {gib['int4']:.2f} | - "
          f"| {gib['int4'] / gib['dense']:.2f}x | {gib['int4'] / gib['dense']:.2f}x | - |")
    d, q, a, h = (r["prefill_ms"] for r in (runs["dense"], runs["int4"], runs["int4 a8"], ref))
    print(f"| prefill {runs['dense']['prompt_tokens']} tokens, ms | {d:.1f} | {q:.1f} | {a:.1f} | {h:.1f} | "
          f"{d / q:.2f}x faster | {d / a:.2f}x faster | {h / q:.2f}x faster |")
    for b in args.batch:
        d, q, a, h = (r["tok_s"][b] for r in (runs["dense"], runs["int4"], runs["int4 a8"], ref))
        print(f"| decode tok/s, batch {b} | {d:.1f} | {q:.1f} | {a:.1f} | {h:.1f} | {q / d:.2f}x | {a / d:.2f}x "
              f"| {q / h:.2f}x |")
    same = runs["dense"]["tokens"] == ref["tokens"]
    print(f"\ndense greedy tokens == HF's: {same}; int4 tokens are not compared (random weights, lossy scheme)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
