"""`qwen-vl-export CHECKPOINT OUT_DIR [--dtype bf16|fp16|fp32] [--graphs vision,embed,decoder] [--weights dense|int4]
[--tp 1|2|4|8]`.

Writes OUT_DIR/{vision,embed,decoder}.onnx with their weights in `<graph>.onnx.data` (external data,
streamed one tensor at a time), and vision.ort.onnx / decoder.ort.onnx: the same graphs for ONNX Runtime with
its fused contrib ops, reading the same .onnx.data files (export/ort_fused.py). With `--tp N` > 1 the decoder is
written as N rank graphs `decoder.rank{r}.onnx` (+ .onnx.data; export/tp.py) instead of decoder.onnx, without
a fused flavour (ONNX Runtime runs the rank graphs themselves: runtime/backends/tp.py). A bad checkpoint ends with
one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .int4 import BLOCK_SIZES
from .onnx_graph import DTYPE_ALIASES
from qwen_vl_trt.model.errors import UserError
from qwen_vl_trt.model.spec import ModelSpec
from .weights import CheckpointWeights


def export_graphs(ckpt_dir, out_dir, dtype: str = "bfloat16", graphs=("vision", "embed", "decoder"),
                  progress=None, int4_block: int | None = None, tp: int = 1) -> dict:
    """Export the graphs of a checkpoint; returns {"spec": ModelSpec, "dtype": str, "graphs": {name: file}}.
    `int4_block`: the decoder's projections as INT4 weight-only blocks of this size (export/int4.py). `tp` > 1: the
    decoder as `tp` rank graphs, listed as graphs["decoder_ranks"] (export/tp.py)."""
    from .decoder import export_decoder
    from .embed import export_embed
    from .ort_fused import write_fused
    from .tp import TensorParallel, check

    dtype = DTYPE_ALIASES[dtype]
    spec = ModelSpec.from_checkpoint(ckpt_dir)
    check(spec, tp)
    weights = CheckpointWeights(ckpt_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exporters = {"vision": spec.family.load("vision_exporter"), "embed": export_embed,
                 "decoder": lambda *a: export_decoder(*a, int4_block=int4_block)}
    if weights.quant and progress:
        progress(f"{weights.quant.describe()}: dequantized to {dtype} as they are read")
    files = {}
    for name in graphs:
        t0 = time.perf_counter()
        if name == "decoder" and tp > 1:  # one graph per rank, one rank at a time (memory: one tensor)
            files["decoder_ranks"] = [export_decoder(spec, weights, out, dtype, int4_block=int4_block,
                                                     tp=TensorParallel(r, tp)).name for r in range(tp)]
            if progress:
                progress(f"exported decoder.rank0..{tp - 1}.onnx in {time.perf_counter() - t0:.1f} s")
            continue
        path = exporters[name](spec, weights, out, dtype)
        files[name] = path.name
        if name in ("vision", "decoder"):  # ONNX Runtime's flavour: same weights, fused contrib ops
            files[f"{name}_ort"] = write_fused(path, spec).name
        if progress:
            progress(f"exported {name}.onnx in {time.perf_counter() - t0:.1f} s")
    return {"spec": spec, "dtype": dtype, "graphs": files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen-vl-export", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json, *.safetensors)")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_ALIASES),
                    help="graph dtype (default bf16, the released checkpoints' dtype; fp16 drifts on Qwen3-VL)")
    ap.add_argument("--graphs", default="vision,embed,decoder")
    ap.add_argument("--weights", default="dense", choices=("dense", "int4"),
                    help="int4: the decoder's projections as INT4 weight-only blocks (round to nearest, no "
                         "calibration; lossy: see export/int4.py). Default: the checkpoint's values")
    ap.add_argument("--int4-block-size", type=int, default=128, choices=BLOCK_SIZES)
    ap.add_argument("--tp", type=int, default=1, choices=(1, 2, 4, 8),
                    help="tensor-parallel ranks: the decoder as N graphs decoder.rank{r}.onnx (export/tp.py)")
    args = ap.parse_args(argv)
    try:
        export_graphs(args.checkpoint, args.out_dir, args.dtype, tuple(args.graphs.split(",")),
                      progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                      int4_block=args.int4_block_size if args.weights == "int4" else None, tp=args.tp)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
