"""ONNX graphs -> TensorRT engines, with optimization profiles derived from the contracts and user limits.

Works with full TensorRT (`tensorrt`) and TensorRT-RTX (`tensorrt_rtx`, which builds ahead of time on a
CPU-only machine for the compute capabilities given). Every named dynamic dim of model/contracts.py gets
min/opt/max from `Limits` (`dim_ranges`); an impossible limit (e.g. max < min) is an error before any build starts.

    python -m qwen_vl_trt.export.build_engines ARTIFACTS_DIR [--max-patches N] [--max-batch B]
        [--max-seq S] [--max-cache-len K] [--compute-capabilities 8.6 8.9 12.0] [--plugins LIB]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from qwen_vl_trt.model.contracts import CONTRACTS, GraphSpec, Limits, dim_ranges
from qwen_vl_trt.model.errors import CheckpointError, UserError
from qwen_vl_trt.model.spec import ModelSpec


def profile_shapes(contract: GraphSpec, limits: Limits) -> dict[str, tuple[tuple, tuple, tuple]]:
    ranges = dim_ranges(limits)
    shapes = {}
    for t in contract.inputs:
        mins, opts, maxs = zip(*((d, d, d) if isinstance(d, int) else ranges[d] for d in t.dims))
        shapes[t.name] = (mins, opts, maxs)
    return shapes


# TensorRT's ONNX importer names the nodes of each inlined model-local function (our RMSNorm function node) after
# the body's value names, so every call after the first logs this, once per node. The names only matter for
# querying intermediate tensors, which no one does; every other message is printed.
_INLINED_NAME_CLASH = "the output tensors of this new instance will not be queryable"


def build_logger(trt):
    """A TensorRT logger at WARNING level, less the inlined-function name clash warning (one line per node)."""

    class BuildLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING) and _INLINED_NAME_CLASH not in msg:
                print(f"[TRT] [{str(severity).rsplit('.', 1)[-1][0]}] {msg}", file=sys.stderr, flush=True)

    return BuildLogger()


def build_engine(trt, onnx_path: Path, engine_path: Path, contract: GraphSpec, limits: Limits,
                 compute_capabilities=(), plugin_lib: str | None = None, timing_cache: Path | None = None,
                 log=print) -> Path:
    from qwen_vl_trt.model.trt_compat import load_plugin_library

    from .plugin_ops import inlined_for_tensorrt

    logger = build_logger(trt)
    builder = trt.Builder(logger)
    if plugin_lib:  # the qwen_vl nodes become PLUGIN_V3 layers; without it TensorRT inlines their ONNX bodies
        try:
            load_plugin_library(plugin_lib, trt=trt)
        except (FileNotFoundError, RuntimeError) as e:
            raise CheckpointError(str(e)) from None
    # Strongly typed: the graph's own casts decide every dtype (bf16/fp16/fp32), as the HF parity needs.
    # TensorRT-RTX networks are always strongly typed; full TensorRT needs the flag.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    inlined = None if plugin_lib else inlined_for_tensorrt(onnx_path)  # MoEExperts bodies, renamed per layer
    if not (parser.parse(inlined, str(onnx_path)) if inlined else parser.parse_from_file(str(onnx_path))):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise CheckpointError(f"{onnx_path}: TensorRT cannot parse the graph: {errors}")
    n_plugins = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
    n_collectives = sum(network.get_layer(i).type == getattr(trt.LayerType, "DIST_COLLECTIVE", None)
                        for i in range(network.num_layers))
    if n_collectives:  # a tensor-parallel rank graph (export/tp.py): its DistCollective nodes, as parsed
        log(f"{onnx_path.name}: {n_collectives} DIST_COLLECTIVE layers parsed")
    config = builder.create_builder_config()
    if n_plugins:  # KVCacheAttention's present_key/value alias past_key/value (in-place cache write)
        config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(contract, limits).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if compute_capabilities and hasattr(config, "num_compute_capabilities"):  # TensorRT-RTX AOT targets
        config.num_compute_capabilities = len(compute_capabilities)
        for i, cc in enumerate(compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + cc.replace(".", "")), i)
    cache = None
    # TensorRT-RTX picks kernels when the engine is loaded on the GPU (its builder times no tactics, and on a
    # machine without a GPU the cache only logs CUDA errors): the timing cache is for full TensorRT.
    rtx = trt.__name__.startswith("tensorrt_rtx")
    if timing_cache is not None and not rtx and hasattr(config, "create_timing_cache"):
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=True)
    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise CheckpointError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    engine_path.write_bytes(bytes(blob))
    if cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    log(f"built {engine_path.name} ({network.num_layers} layers, {n_plugins} plugin) in {time.perf_counter() - t0:.1f} s")
    return engine_path


def build_all(artifacts: Path, limits: Limits, compute_capabilities=(), plugin_lib=None, dtype="float32",
              spec: ModelSpec | None = None, log=print, graphs=tuple(CONTRACTS)) -> dict[str, str]:
    from qwen_vl_trt.model.trt_compat import import_tensorrt

    limits.check()
    trt = import_tensorrt()
    spec = spec or ModelSpec.from_checkpoint(artifacts)
    engines = {}
    for name in graphs:
        onnx_path = artifacts / f"{name}.onnx"
        engines[name] = build_engine(trt, onnx_path, artifacts / f"{name}.engine",
                                     _contract(name, spec, artifacts).resolve(dtype), limits, compute_capabilities,
                                     plugin_lib, artifacts / "timing.cache", log).name
    return engines


def _contract(name: str, spec: ModelSpec, artifacts: Path) -> GraphSpec:
    """The contract of graph `name`; `decoder.rank{r}` (a --tp export, export/tp.py): the decoder's for rank r's
    heads, the number of ranks read from the graph's DistCollective nodes (`nb_rank`)."""
    if not name.startswith("decoder.rank"):
        return CONTRACTS[name](spec)
    import onnx

    from qwen_vl_trt.model.tp import TensorParallel, rank_spec

    graph = onnx.load(str(artifacts / f"{name}.onnx"), load_external_data=False).graph
    sizes = {a.i for n in graph.node if n.op_type == "DistCollective" for a in n.attribute if a.name == "nb_rank"}
    if len(sizes) != 1:
        raise CheckpointError(f"{artifacts / name}.onnx: not a tensor-parallel rank graph (DistCollective nb_rank "
                              f"{sorted(sizes) or 'missing'}); export it with qwen-vl-export --tp N")
    return CONTRACTS["decoder"](rank_spec(spec, TensorParallel(int(name[len("decoder.rank"):]), sizes.pop())))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="build_engines", description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path, help="directory with the ONNX graphs and config.json")
    for field, default in asdict(Limits()).items():
        ap.add_argument("--" + field.replace("_", "-"), type=int, default=default)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compute-capabilities", nargs="*", default=[], help="TensorRT-RTX AOT targets, e.g. 8.6 12.0")
    ap.add_argument("--plugins", default=None, help="plugin library to load (libqwen_vl_plugins.so)")
    ap.add_argument("--graphs", default=",".join(CONTRACTS),
                    help="which engines to build (default: all three; decoder.rank0,decoder.rank1,...: a --tp export's ranks)")
    args = ap.parse_args(argv)
    limits = Limits(**{f: getattr(args, f) for f in asdict(Limits())})
    try:
        build_all(args.artifacts, limits, args.compute_capabilities, args.plugins, args.dtype,
                  log=lambda m: print(m, file=sys.stderr, flush=True), graphs=tuple(args.graphs.split(",")))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: no TensorRT module ({e}); install tensorrt or tensorrt-rtx", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
