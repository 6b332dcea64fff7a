"""Decoder bytes per weight format: decoder.onnx.data and the TensorRT-RTX engine (a script; issue 20's targets:
FP8 decoder engine <= 0.55x bf16, INT4 <= 0.30x, lm_head included).

  python bench/bench_weight_bytes.py [--families qwen3_vl qwen2_5_vl] [--int4-block-size 32]
                                     [--compute-capability 8.9] [--work DIR]

For each tiny test model (export/demo_checkpoint.py, seed 0) and each `--weights` value: a bf16 decoder.onnx
(export/cli.py), its weight bytes, and a TensorRT-RTX ahead-of-time engine for one compute capability (8.9: FP8
needs Ada or later; no plugin library, so only the weights differ). The tiny models are dominated by lm_head
(151936 x 64 of their ~10.6 M decoder weights), so formats that keep lm_head dense change little there; the
down_proj's K = 37 is not a whole INT4 block (it stays dense in INT4; FP8 takes it as one partial block).
The int4 block is 32 here because the tiny models' K = 64 is smaller than the default 128.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import machine, utc_now  # noqa: E402

FORMATS = ("dense", "fp8", "fp8,lm_head=fp8", "int4", "int4,lm_head=int8", "attention=fp8,mlp=int4,lm_head=int4")


def build(out: Path, cc: str) -> int:
    from qwen_vl_trt.model.trt_compat import rtx_env

    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.build_engines", str(out), "--dtype", "bfloat16",
                        "--graphs", "decoder", "--max-batch", "2", "--max-seq", "64", "--max-cache-len", "128",
                        "--compute-capabilities", cc], capture_output=True, text=True, env=rtx_env())
    if r.returncode != 0:
        raise SystemExit(f"engine build failed in {out}: {r.stderr[-2000:]}")
    return (out / "decoder.engine").stat().st_size


def main(argv=None) -> int:
    from qwen_vl_trt.export.cli import export_graphs
    from qwen_vl_trt.export.demo_checkpoint import make_checkpoint
    from qwen_vl_trt.model.weight_formats import WeightFormats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["qwen3_vl", "qwen2_5_vl"])
    ap.add_argument("--int4-block-size", type=int, default=32)
    ap.add_argument("--compute-capability", default="8.9")
    ap.add_argument("--work", type=Path)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="qwen-vl-bytes-"))
    rows = []
    for family in args.families:
        ckpt = make_checkpoint(work / f"ckpt-{family}", family, seed=0)
        for text in FORMATS:
            t0 = time.perf_counter()
            out = work / f"{family}-{text.replace(',', '_').replace('=', '-')}"
            formats = WeightFormats.parse(text, int4_block=args.int4_block_size)
            export_graphs(ckpt, out, "bf16", graphs=("decoder",), formats=formats)
            (out / "config.json").write_bytes((ckpt / "config.json").read_bytes())
            rows.append((family, text, formats.describe(), (out / "decoder.onnx.data").stat().st_size,
                         build(out, args.compute_capability)))
            print(f"{family} {text}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"# Decoder bytes per weight format -- {utc_now()}")
    print(f"machine: {machine()}; bf16 graphs, TensorRT-RTX AOT engine for sm_{args.compute_capability.replace('.', '')},"
          f" no plugins, INT4 block {args.int4_block_size}")
    print(f"command: python bench/bench_weight_bytes.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print("| model | --weights | decoder.onnx.data MB | x dense | engine MB | x dense |")
    print("|---|---|---|---|---|---|")
    base = {}
    for family, text, _, data, engine in rows:
        base.setdefault(family, (data, engine))
        d0, e0 = base[family]
        print(f"| {family} | `{text}` | {data / 1e6:.2f} | {data / d0:.2f}x | {engine / 1e6:.2f} | {engine / e0:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
