"""Which backend runs an artifact directory: `open_sessions(manifest, backend)` -> (name, {graph: Session}).

auto picks TensorRT when the manifest lists engines and a TensorRT module, cuda-python and a GPU can run them,
else ONNX Runtime; an explicit choice that cannot run is a BackendUnavailable / ArtifactError line. A tensor-parallel
export (manifest tp > 1) runs its decoder ranks on N GPUs with TensorRT when its rank engines were built
(runtime/backends/trt_tp.py: one process, NCCL), else on ONNX Runtime's CPU provider (runtime/backends/tp.py).
"""
from __future__ import annotations

from qwen_vl_trt.model.contracts import dim_ranges
from qwen_vl_trt.model.errors import ArtifactError, BackendUnavailable, UserError

from .cuda import cudart as _cudart
from . import ort_cache as optimized_cache
from . import ort_int4_kernel
from .ort import open_ort, ort_providers


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when a TensorRT module, cuda-python and a CUDA GPU are all there, else (False, why)."""
    try:
        from qwen_vl_trt.model.trt_compat import import_tensorrt

        import_tensorrt()
    except ImportError:
        return False, "no TensorRT module (tensorrt or tensorrt_rtx) is installed"
    try:
        cudart = _cudart()
    except ImportError:
        return False, "cuda-python (cuda.bindings) is not installed; pip install cuda-python"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        return False, "no CUDA GPU is visible"
    return True, ""


def open_sessions(manifest, backend: str = "auto", *, io_binding: bool = True, threads: int = 0,
                  cuda_graph: bool = True, ort_fused: bool = True, int4_activations: str | None = None,
                  ort_cache=None, ort_prepack: bool = True, int4_kernel: str = "auto", dense_kernel: str = "auto",
                  started=None) -> tuple[str, dict]:
    """-> (backend used, {"vision"|"embed"|"decoder": Session}). `backend`: auto | tensorrt | onnxruntime.
    `io_binding` False: ONNX Runtime with plain numpy feeds (the simple reference path); `cuda_graph` False: no
    CUDA graph capture of the decode step (ONNX Runtime's CUDA EP, TensorRT); `ort_fused` False: ONNX Runtime
    runs vision.onnx / decoder.onnx (the plugin graphs' reference bodies) even where the .ort.onnx files exist.
    `int4_activations` (fp32 | int8): overrides the manifest's for ONNX Runtime's INT4 MatMulNBits fusion
    (accuracy level 1 | 4; model/weight_formats.py). The explicit MatMulNBits nodes of a bf16 decoder.ort.onnx keep
    the level the export wrote into them.
    ONNX Runtime on the CPU with `ort_prepack` False (opt-in: start-up without the weight copy, but decode steps
    measured slower on a busy machine, docs/benchmarks.md): vision, embed and a dense decoder run on their
    memory-mapped weights (ort.weights_mapped); a quantized decoder (MatMulNBits) keeps ONNX Runtime's
    prepacking. `ort_cache`: a folder for ONNX Runtime's optimized models of all three graphs
    (runtime/backends/ort_cache.py); None: the default cache (`default_ort_cache`); False: none.
    `int4_kernel` (auto | mlas): auto runs an INT4 decoder's products with fp32 activations by qwen_vl::MatMulInt4
    (runtime/backends/ort_int4_kernel.py) where its library is built, the CPU has AVX-512F and a cache folder holds
    the renamed graph; mlas, or anywhere else: ONNX Runtime's MatMulNBits.
    `dense_kernel` (auto | mlas): auto runs a dense fp32 decoder's products by qwen_vl::MatMulF32 on its
    memory-mapped weights (runtime/backends/ort_f32_kernel.py) where the same library runs, on ONNX Runtime's CPU
    provider with a cache folder (the default one unless `ort_cache` is False); the decoder then needs no
    prepacking whatever `ort_prepack` says. mlas, or anywhere else: ONNX Runtime's MatMul / Gemm.
    `started` (a threading.Event): set once the sessions' creation has begun (ort.open_ort; at once on the other
    paths), for runtime/startup.py."""
    formats = manifest.weight_formats()
    if int4_activations is not None:
        formats = formats.with_(int4_activations=int4_activations)
        formats.check()
    if backend not in ("auto", "tensorrt", "onnxruntime"):
        raise BackendUnavailable(f"unknown backend {backend!r}; use auto, tensorrt or onnxruntime")
    engines = manifest.engine_paths()
    if manifest.tp > 1 and not manifest.rank_engine_paths():
        engines = {}  # rank graphs without rank engines: ONNX Runtime ranks only
    if backend == "tensorrt" or (backend == "auto" and engines):
        ok, why = tensorrt_available()
        if backend == "tensorrt" and not ok:
            raise BackendUnavailable(f"--backend tensorrt: {why}; use --backend onnxruntime")
        if backend == "tensorrt" and not engines:
            raise ArtifactError(f"--backend tensorrt: {manifest.directory} has no TensorRT engines; run export_all.sh "
                                "on a machine with TensorRT, or use --backend onnxruntime")
        if ok and engines and manifest.tp > 1:
            return "tensorrt", _open_trt_tp(manifest, engines, cuda_graph)
        if ok and engines:
            from .trt import open_trt

            _set(started)
            return "tensorrt", open_trt(engines, manifest.contracts, manifest.plugin_library(),
                                        dim_ranges(manifest.limits), cuda_graph=cuda_graph)
    if manifest.tp > 1:
        _set(started)
        return "onnxruntime", _open_tp(manifest, backend, io_binding, threads)
    in_place = ort_fused and bool(manifest.graphs["decoder"].get("onnx_ort"))  # decoder.ort.onnx is opened
    mapped = () if ort_prepack else {"vision", "embed"} | ({"decoder"} if formats.is_dense else set())
    cache_dir, cached, ordered = (None, (), ()) if ort_cache is False else \
        (ort_cache, None, ()) if ort_cache is not None else default_ort_cache(manifest, formats, ort_prepack)
    if int4_kernel not in ("auto", "mlas"):
        raise UserError(f"--int4-kernel {int4_kernel}: use auto or mlas")
    if dense_kernel not in ("auto", "mlas"):
        raise UserError(f"--dense-kernel {dense_kernel}: use auto or mlas")
    kernel = dense = None
    if int4_kernel == "auto" and not formats.is_dense and formats.accuracy_level != 4 and cache_dir is not None:
        kernel = ort_int4_kernel.library()
    if dense_kernel == "auto" and formats.is_dense and manifest.dtype == "float32" and ort_cache is not False \
            and ort_providers() == ("CPUExecutionProvider",):
        dense = ort_int4_kernel.library()  # the same library holds qwen_vl::MatMulF32
        if dense is not None:
            cache_dir = cache_dir if cache_dir is not None else optimized_cache.default_dir(manifest.directory)
            ordered = frozenset(ordered) - {"decoder"}
    return "onnxruntime", open_ort(manifest.graph_paths(fused=ort_fused), manifest.contracts, io_binding=io_binding,
                                   threads=threads, cuda_graph=cuda_graph, kv_in_place=in_place,
                                   int4_accuracy_level=formats.accuracy_level, mapped=mapped, cache_dir=cache_dir,
                                   cached=cached, prepack_order=ordered, int4_kernel=kernel, f32_kernel=dense,
                                   started=started)


def default_ort_cache(manifest, formats, prepack: bool = True) -> tuple:
    """(folder, graphs with ONNX Runtime's optimized model cached, graphs with their prepack order cached) when no
    cache is asked for, on ONNX Runtime's CPU provider, in ort_cache.default_dir:
    - a quantized decoder: its optimized model (the DequantizeLinear + MatMul -> MatMulNBits fusion is redone at
      every load otherwise; one copy of its weights on disk);
    - a dense decoder that is prepacked: its graph with the node of its largest weight first
      (runtime/backends/prepack_order.py: lm_head packed first, 1.2 GB less peak RSS on the benchmark's
      checkpoint; the graph only, no weights). Its optimized model would gain nothing (the load is ONNX Runtime's
      prepacking, which no saved model holds: docs/benchmarks.md) for a full copy of its weights;
    - vision and embed: nothing.
    Elsewhere (None, (), ())."""
    if ort_providers() != ("CPUExecutionProvider",):
        return None, (), ()
    folder = optimized_cache.default_dir(manifest.directory)
    if not formats.is_dense:
        return folder, frozenset({"decoder"}), ()
    return (folder, (), frozenset({"decoder"})) if prepack else (None, (), ())


def _set(event) -> None:
    if event is not None:
        event.set()


def _open_trt_tp(manifest, engines: dict, cuda_graph: bool) -> dict:
    """A --tp N artifact directory with rank engines: vision and embed on GPU 0, the decoder over N GPUs
    (runtime/backends/trt_tp.py)."""
    from qwen_vl_trt.model.tp import TensorParallel, rank_spec
    from qwen_vl_trt.model.contracts import decoder_contract

    from .trt_tp import open_trt_tp

    size, t = manifest.tp, manifest.spec.text
    rank_contracts = [decoder_contract(rank_spec(manifest.spec, TensorParallel(r, size))).resolve(manifest.dtype)
                      for r in range(size)]
    spans = [TensorParallel(r, size).kv_heads(t.num_key_value_heads) for r in range(size)]
    return open_trt_tp(engines, manifest.rank_engine_paths(), manifest.contracts, rank_contracts, spans,
                       manifest.plugin_library(), dim_ranges(manifest.limits), cuda_graph=cuda_graph)


def _open_tp(manifest, backend: str, io_binding: bool, threads: int) -> dict:
    """A --tp N artifact directory: vision and embed on ONNX Runtime in this process, the decoder over N rank
    processes (runtime/backends/tp.py)."""
    from .tp import TpDecoderSession

    paths = manifest.graph_paths(fused=True)
    sessions = open_ort({name: paths[name] for name in ("vision", "embed")}, manifest.contracts,
                        io_binding=io_binding, threads=threads, cuda_graph=False)
    sessions["decoder"] = TpDecoderSession(manifest, threads)
    return sessions
