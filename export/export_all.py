"""The export, all steps in one place: checkpoint -> a complete artifact directory. `export_all.sh` only calls this.

    python -m qwen_vl_trt.export.export_all [CHECKPOINT] [ARTIFACTS] [--dtype fp32|fp16|bf16] [--no-engines]
        [--max-patches N] [--max-frames N] [--max-batch B] [--max-seq S] [--max-cache-len K]
        [--compute-capabilities "8.6 12.0"] [--weights FORMATS] [--int4-block-size 16|32|64|128]
        [--int4-activations fp32|int8] [--tp 1|2|4|8]

  [1/5] the checkpoint (none given: the tiny random-weight Qwen3-VL demo checkpoint in ARTIFACTS/demo_checkpoint,
        fp32 by default since ONNX Runtime's CPU provider has no bf16 MatMul; a real checkpoint defaults to bf16)
  [2/5] vision/embed/decoder.onnx (+ .onnx.data) and vision/decoder.ort.onnx (export/cli.py); with --tp N > 1
        decoder.rank{0..N-1}.onnx instead of the decoder (export/tp.py)
  [3/5] the tokenizer, chat template, processor and generation configs (export/artifacts.py)
  [4/5] TensorRT engines when a TensorRT module is importable (export/build_engines.py; with the plugin library
        when it is built: model/trt_compat.py plugin_library_path); with --tp N one engine per decoder rank
        (decoder.rank{r}.engine, run by runtime/backends/trt_tp.py)
  [5/5] manifest.json (model/manifest.py)

ARTIFACTS defaults to artifacts/, what `trt-run` reads by default. A stale manifest.json or engine is removed
first, so a failed export never leaves one behind. Errors: one `error:` line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from qwen_vl_trt.model.contracts import CONTRACTS, Limits
from qwen_vl_trt.model.errors import CheckpointError, UserError

from .artifacts import copy_checkpoint_files, write_manifest
from qwen_vl_trt.model.weight_formats import WeightFormats

from .onnx_graph import DTYPE_ALIASES


def export_all(ckpt, out, dtype: str | None = None, limits: Limits = Limits(), *, engines: bool = False,
               compute_capabilities=(), formats: WeightFormats = WeightFormats(), tp: int = 1, log=None) -> Path:
    """All steps of the module docstring; returns out/manifest.json. `formats`: the weight format per group
    (model/weight_formats.py, `--weights`). `tp`: tensor-parallel ranks of the decoder (export/tp.py). `engines`:
    build them when a TensorRT module
    is importable (TensorRT-RTX with plugin nodes needs LD_LIBRARY_PATH from before the process started: `main`
    re-executes itself with it)."""
    log = log or (lambda msg: None)
    out = Path(out)
    ckpt, dtype = _checkpoint(ckpt, out, dtype, log)
    if dtype not in DTYPE_ALIASES:
        raise CheckpointError(f"--dtype {dtype}: use fp32, fp16 or bf16")
    limits.check()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ["manifest.json"] + [f"{name}.engine" for name in CONTRACTS]:
        (out / stale).unlink(missing_ok=True)
    for stale in out.glob("decoder.rank*"):  # another --tp N's rank graphs (and engines)
        stale.unlink()
    log(f"[2/5] exporting vision/embed/decoder graphs to {out}")
    from .cli import export_graphs

    export_graphs(ckpt, out, dtype, progress=log, formats=formats, tp=tp)
    log("[3/5] copying tokenizer, chat template, processor and generation configs")
    copy_checkpoint_files(ckpt, out)
    plugins = _engines(out, dtype, limits, compute_capabilities, log, tp) if engines else None
    if not engines:
        log("[4/5] --no-engines: skipping engines")
    log(f"[5/5] writing {out}/manifest.json")
    return write_manifest(ckpt, out, dtype, limits, engines=plugins is not None, plugins=plugins or None, tp=tp)


def _checkpoint(ckpt, out: Path, dtype: str | None, log) -> tuple[Path, str]:
    if ckpt is None or str(ckpt) == "":  # `export_all.sh "" OUT`: the demo checkpoint into OUT
        ckpt, dtype = out / "demo_checkpoint", dtype or "fp32"
        log(f"[1/5] no checkpoint given: making the tiny random-weight Qwen3-VL demo checkpoint in {ckpt} "
            f"(dtype {dtype}: ONNX Runtime CPU cannot run bf16 MatMul)")
        from .demo_checkpoint import make_checkpoint

        make_checkpoint(ckpt, "qwen3_vl", seed=0)
    else:
        ckpt, dtype = Path(ckpt), dtype or "bf16"
        log(f"[1/5] checkpoint {ckpt} (dtype {dtype})")
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt}/config.json not found (is {ckpt} a Hugging Face checkpoint directory?)")
    return ckpt, dtype


def _engines(out: Path, dtype: str, limits: Limits, compute_capabilities, log, tp: int = 1) -> str | None:
    """Build the three engines when TensorRT is importable (with `tp` > 1 vision, embed and one engine per decoder
    rank, decoder.rank{r}.engine: runtime/backends/trt_tp.py runs them) -> the plugin library used ("" without
    one), or None when there is no TensorRT."""
    from qwen_vl_trt.model.trt_compat import import_tensorrt, plugin_library_path, rtx_env_ready

    from .build_engines import build_all

    try:
        import_tensorrt()
    except ImportError:
        log("[4/5] TensorRT not available: skipping engines")
        return None
    lib = plugin_library_path()
    lib = str(lib) if lib.is_file() else ""
    if lib and not rtx_env_ready():
        raise CheckpointError("TensorRT-RTX parses plugin nodes only with its library directory on LD_LIBRARY_PATH "
                              "from the start of the process: run `python -m qwen_vl_trt.export.export_all`, which "
                              "sets it, or export LD_LIBRARY_PATH=$(python -m qwen_vl_trt.model.trt_compat)")
    log("[4/5] building TensorRT engines (this can take minutes per graph)")
    graphs = ("vision", "embed", "decoder") if tp == 1 else ("vision", "embed", *(f"decoder.rank{r}" for r in range(tp)))
    build_all(out, limits, tuple(compute_capabilities), lib or None, DTYPE_ALIASES[dtype], log=log, graphs=graphs)
    return lib


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="export_all.sh", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", help="Hugging Face checkpoint directory (default, or \"\": the demo checkpoint)")
    ap.add_argument("artifacts", nargs="?", default="artifacts", help="artifact directory (default: artifacts)")
    ap.add_argument("--dtype", help="fp32, fp16 or bf16 (default: bf16; the demo checkpoint: fp32)")
    ap.add_argument("--no-engines", action="store_true", help="no TensorRT engines even when TensorRT is there")
    for key, default in asdict(Limits()).items():
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=default)
    ap.add_argument("--compute-capabilities", default="", help='TensorRT-RTX AOT targets, e.g. "8.6 12.0"')
    from .cli import add_weight_arguments

    add_weight_arguments(ap)  # --weights ... and --tp
    return ap


def main(argv=None) -> int:
    from .cli import weight_formats

    args = parser().parse_args(argv)
    try:
        formats = weight_formats(args)  # a bad --weights fails before anything else
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.no_engines:
        from qwen_vl_trt.model.trt_compat import reexec_with_rtx_env

        reexec_with_rtx_env()  # TensorRT-RTX's parser needs LD_LIBRARY_PATH before the process starts
    limits = Limits(**{k: getattr(args, k) for k in asdict(Limits())})
    try:
        manifest = export_all(args.checkpoint, args.artifacts, args.dtype, limits, engines=not args.no_engines,
                              compute_capabilities=args.compute_capabilities.split(), formats=formats, tp=args.tp,
                              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: trt-run --model-dir {manifest.parent} --image PICTURE", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
