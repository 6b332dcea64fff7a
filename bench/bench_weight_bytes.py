"""Decoder bytes per weight format: decoder.onnx.data and the TensorRT-RTX engine (a script; issue 20's targets:
FP8 decoder engine <= 0.55x bf16, INT4 <= 0.30x, lm_head included).

  python bench/bench_weight_bytes.py [--models tiny wide medium] [--formats dense fp8 int4 ...]
                                     [--int4-block-size 32] [--compute-capability 8.9] [--work DIR]

For each model and each `--weights` value: a bf16 decoder.onnx (export/cli.py), its weight bytes, and a
TensorRT-RTX ahead-of-time engine for one compute capability (8.9: FP8 needs Ada or later; no plugin library, so
only the weights differ). Models (export/demo_checkpoint.py, random weights):
- `tiny`: the test suite's Qwen3-VL (4 layers, C = 64, I = 37, V = 151936): lm_head is 9.7 M of its 10.4 M
  decoder weights, so formats that keep lm_head dense change little; down_proj's K = 37 is not a whole INT4 block
  (it stays dense in INT4; FP8 takes it as one partial block); its projections (127 K weights) are below the few
  hundred KB by which engines vary with the kernels they carry;
- `wide`: 2 layers, C = 512, I = 1024, 16 heads / 4 KV heads of 32, V = 4096: projections 4.5 M, lm_head 2.1 M
  weights (32 %; Qwen3-VL-2B: 18 %, tied);
- `medium`: 8 layers, C = 1024, I = 3072, 32 heads / 8 KV heads of 32, V = 32768: projections 96 M, lm_head 34 M
  weights (26 %), so that the engines' fixed payload (kernels, ~4-6 MB) is small against the weights.
The int4 block is 32 by default here because the tiny model's K = 64 is smaller than the export's default 128.
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

def _wide() -> dict:
    from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_TINY

    text = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 16,
            "num_key_value_heads": 4, "vocab_size": 4096}
    return {"text_config": {**QWEN3_VL_TINY["text_config"], **text},
            "vision_config": {**QWEN3_VL_TINY["vision_config"], "out_hidden_size": 512,
                              "deepstack_visual_indexes": [0, 1]}}


def _medium() -> dict:
    from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_TINY

    text = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 8, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 32768}
    return {"text_config": {**QWEN3_VL_TINY["text_config"], **text},
            "vision_config": {**QWEN3_VL_TINY["vision_config"], "out_hidden_size": 1024}}


MODELS = {"tiny": lambda: None, "wide": _wide, "medium": _medium}
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
    ap.add_argument("--models", nargs="+", default=["tiny", "wide"], choices=sorted(MODELS))
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), help="--weights values (default: all of FORMATS)")
    ap.add_argument("--int4-block-size", type=int, default=32)
    ap.add_argument("--compute-capability", default="8.9")
    ap.add_argument("--work", type=Path)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="qwen-vl-bytes-"))
    rows = []
    for family in args.models:
        ckpt = make_checkpoint(work / f"ckpt-{family}", "qwen3_vl", seed=0, config_overrides=MODELS[family]())
        for text in args.formats:
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
    print("| model | --weights | decoder.onnx.data MB | x dense | engine MB | x dense | engine - data MB |")
    print("|---|---|---|---|---|---|---|")
    base = {}
    for family, text, _, data, engine in rows:
        base.setdefault(family, (data, engine))
        d0, e0 = base[family]
        print(f"| {family} | `{text}` | {data / 1e6:.2f} | {data / d0:.2f}x | {engine / 1e6:.2f} | {engine / e0:.2f}x "
              f"| {(engine - data) / 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
