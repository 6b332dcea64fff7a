"""`qwen-vl-export CHECKPOINT OUT_DIR [--dtype bf16|fp16|fp32] [--graphs vision,embed,decoder] [--weights FORMATS]
[--int4-block-size 16|32|64|128] [--int4-activations fp32|int8] [--tp 1|2|4|8] [--budget-layers N]`.

Writes OUT_DIR/{vision,embed,decoder}.onnx with their weights in `<graph>.onnx.data` (external data,
streamed one tensor at a time), and vision.ort.onnx / decoder.ort.onnx: the same graphs for ONNX Runtime with
its fused contrib ops, reading the same .onnx.data files (export/ort_fused.py). `--weights`: the format of each
group of decoder weights (model/weight_formats.py: `dense`, `fp8`, `int4` or `GROUP=FORMAT,...`). With `--tp N` > 1
the decoder is written as N rank graphs `decoder.rank{r}.onnx` (+ .onnx.data; export/tp.py) instead of
decoder.onnx, without a fused flavour (ONNX Runtime runs the rank graphs themselves: runtime/backends/tp.py), in any
`--weights` format: each rank stores exactly its slice of the 1-rank quantized weights, and a row-parallel layer
whose per-rank K is not a whole number of blocks is refused in one line (export/tp.py `check_formats`). The decoder's weight bytes per group and per layer are logged at the end of its export
(export/weight_report.py; `--budget-layers N`: also extrapolated to N layers). A bad checkpoint or flag value
ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .onnx_graph import DTYPE_ALIASES
from qwen_vl_trt.model.errors import UserError
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.weight_formats import DEFAULT_INT4_BLOCK, INT4_BLOCK_SIZES, WeightFormats
from .weights import CheckpointWeights


def export_graphs(ckpt_dir, out_dir, dtype: str = "bfloat16", graphs=("vision", "embed", "decoder"),
                  progress=None, formats: WeightFormats = WeightFormats(), tp: int = 1,
                  budget_layers: int | None = None) -> dict:
    """Export the graphs of a checkpoint; returns {"spec": ModelSpec, "dtype": str, "graphs": {name: file}}.
    `formats`: the format of each group of decoder weights (model/weight_formats.py; export/int4.py, fp8.py,
    int8.py; the experts group is export/moe.py's), recorded in decoder.onnx's and embed.onnx's metadata. `tp` > 1:
    the decoder as `tp` rank graphs, listed as graphs["decoder_ranks"] (export/tp.py; quantized formats: `check_formats`).
    At the end of the decoder export `progress` gets its weight bytes per group and per layer (export/weight_report.py),
    extrapolated to `budget_layers` layers (default: the checkpoint's depth)."""
    from .decoder import export_decoder
    from .embed import export_embed
    from .ort_fused import write_fused
    from .quantized import Fp8Weights
    from .tp import TensorParallel, check, check_formats
    from .weight_report import report_lines, weight_bytes

    dtype = DTYPE_ALIASES[dtype]
    if budget_layers is not None and budget_layers < 1:
        raise UserError(f"--budget-layers {budget_layers}: use a number of layers >= 1")
    spec = ModelSpec.from_checkpoint(ckpt_dir)
    check(spec, tp)
    weights = CheckpointWeights(ckpt_dir)
    check_formats(spec, formats, tp, isinstance(weights.quant, Fp8Weights))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    formats.check()
    exporters = {"vision": spec.family.load("vision_exporter"), "embed": lambda *a: export_embed(*a, formats),
                 "decoder": lambda *a: export_decoder(*a, formats)}
    if progress:
        progress(f"weights: {formats.describe()}")
        if weights.quant:
            kept = " (FP8 groups keep the checkpoint's e4m3 bytes and scales)" if "fp8" in formats.describe() else ""
            progress(f"{weights.quant.describe()}: dense groups dequantized to {dtype} as they are read{kept}")
    files = {}
    for name in graphs:
        t0 = time.perf_counter()
        if name == "decoder" and tp > 1:  # one graph per rank, one rank at a time (memory: one tensor)
            files["decoder_ranks"] = [export_decoder(spec, weights, out, dtype, formats, tp=TensorParallel(r, tp)).name
                                      for r in range(tp)]
            if progress:
                progress(f"exported decoder.rank0..{tp - 1}.onnx in {time.perf_counter() - t0:.1f} s")
                for line in report_lines(weight_bytes(out / files["decoder_ranks"][0], formats), budget_layers):
                    progress(f"rank 0: {line}")
            continue
        path = exporters[name](spec, weights, out, dtype)
        files[name] = path.name
        if name in ("vision", "decoder"):  # ONNX Runtime's flavour: same weights, fused contrib ops
            files[f"{name}_ort"] = write_fused(path, spec).name
        if progress:
            progress(f"exported {name}.onnx in {time.perf_counter() - t0:.1f} s")
            if name == "decoder":
                for line in report_lines(weight_bytes(path, formats), budget_layers):
                    progress(line)
    return {"spec": spec, "dtype": dtype, "graphs": files}


def add_weight_arguments(ap: argparse.ArgumentParser) -> None:
    """--weights, --int4-block-size, --int4-activations (qwen-vl-export and export_all.sh alike)."""
    ap.add_argument("--weights", default="dense",
                    help="format per group of decoder weights (model/weight_formats.py): dense (the checkpoint's "
                         "values), fp8 (every projection as e4m3 blocks of 128 along K; an FP8 checkpoint keeps its "
                         "bytes, exact), int4 (projections, experts and lm_head as INT4 blocks; round to nearest, "
                         "lossy), or GROUP=FORMAT,... with GROUP attention|mlp|experts|lm_head, e.g. "
                         "attention=fp8,experts=int4 or int4,lm_head=int8")
    ap.add_argument("--int4-block-size", type=int, default=None,
                    help=f"INT4 block along K, one of {INT4_BLOCK_SIZES} (default: {DEFAULT_INT4_BLOCK}, for either "
                         "--int4-activations: model/weight_formats.py DEFAULT_INT4_BLOCK; 32 is the finer, "
                         "18 %% more bytes)")
    ap.add_argument("--int4-activations", default="fp32",
                    help="fp32 (default: ONNX Runtime's MatMulNBits at accuracy level 1, the exact product) or int8 "
                         "(level 4: activations rounded to int8, faster on CPUs, lossy); recorded in manifest.json, "
                         "trt-run --int4-activations overrides it")
    ap.add_argument("--tp", type=int, default=1, choices=(1, 2, 4, 8),
                    help="tensor-parallel ranks: the decoder as N graphs decoder.rank{r}.onnx (export/tp.py); composes with "
                         "every --weights format (each rank holds its slice of the 1-rank quantized weights)")


def weight_formats(args) -> WeightFormats:
    """The WeightFormats of parsed `add_weight_arguments` flags (a UserError names a bad value)."""
    return WeightFormats.parse(args.weights, args.int4_block_size, args.int4_activations)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen-vl-export", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json, *.safetensors)")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_ALIASES),
                    help="graph dtype (default bf16, the released checkpoints' dtype; fp16 drifts on Qwen3-VL)")
    ap.add_argument("--graphs", default="vision,embed,decoder")
    ap.add_argument("--budget-layers", type=int, default=None,
                    help="report the decoder's weight bytes extrapolated to N layers (e.g. the released depth of a "
                         "depth-cut checkpoint; export/weight_report.py); default: the checkpoint's depth")
    add_weight_arguments(ap)
    args = ap.parse_args(argv)
    try:
        export_graphs(args.checkpoint, args.out_dir, args.dtype, tuple(args.graphs.split(",")),
                      progress=lambda msg: print(msg, file=sys.stderr, flush=True), formats=weight_formats(args),
                      tp=args.tp, budget_layers=args.budget_layers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
