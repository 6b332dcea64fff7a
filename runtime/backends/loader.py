"""Which backend runs an artifact directory: `open_sessions(manifest, backend)` -> (name, {graph: Session}).

auto picks TensorRT when the manifest lists engines and a TensorRT module, cuda-python and a GPU can run them,
else ONNX Runtime; an explicit choice that cannot run is a BackendUnavailable / ArtifactError line. A tensor-parallel
export (manifest tp > 1) runs its decoder ranks on ONNX Runtime's CPU provider (runtime/backends/tp.py).
"""
from __future__ import annotations

from qwen_vl_trt.model.contracts import dim_ranges
from qwen_vl_trt.model.errors import ArtifactError, BackendUnavailable

from .cuda import cudart as _cudart
from .ort import open_ort


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
                  ort_cache=None, ort_prepack: bool = False) -> tuple[str, dict]:
    """-> (backend used, {"vision"|"embed"|"decoder": Session}). `backend`: auto | tensorrt | onnxruntime.
    `io_binding` False: ONNX Runtime with plain numpy feeds (the simple reference path); `cuda_graph` False: no
    CUDA graph capture of the decode step (ONNX Runtime's CUDA EP, TensorRT); `ort_fused` False: ONNX Runtime
    runs vision.onnx / decoder.onnx (the plugin graphs' reference bodies) even where the .ort.onnx files exist.
    `int4_activations` (fp32 | int8): overrides the manifest's for ONNX Runtime's INT4 MatMulNBits fusion
    (accuracy level 1 | 4; model/weight_formats.py). The explicit MatMulNBits nodes of a bf16 decoder.ort.onnx keep
    the level the export wrote into them.
    ONNX Runtime on the CPU: vision, embed and a dense decoder run on their memory-mapped weights
    (ort.weights_mapped) unless `ort_prepack`; a quantized decoder (MatMulNBits) keeps ONNX Runtime's
    prepacking. `ort_cache`: a folder for ONNX Runtime's optimized models (runtime/backends/ort_cache.py)."""
    formats = manifest.weight_formats()
    if int4_activations is not None:
        formats = formats.with_(int4_activations=int4_activations)
        formats.check()
    if backend not in ("auto", "tensorrt", "onnxruntime"):
        raise BackendUnavailable(f"unknown backend {backend!r}; use auto, tensorrt or onnxruntime")
    engines = manifest.engine_paths()
    if backend == "tensorrt" and manifest.tp > 1:
        raise BackendUnavailable(f"--backend tensorrt: {manifest.directory} is a --tp {manifest.tp} export, which runs "
                                 "on ONNX Runtime (CPU) only so far; use --backend onnxruntime")
    if backend == "tensorrt" or (backend == "auto" and engines):
        ok, why = tensorrt_available()
        if backend == "tensorrt" and not ok:
            raise BackendUnavailable(f"--backend tensorrt: {why}; use --backend onnxruntime")
        if backend == "tensorrt" and not engines:
            raise ArtifactError(f"--backend tensorrt: {manifest.directory} has no TensorRT engines; run export_all.sh "
                                "on a machine with TensorRT, or use --backend onnxruntime")
        if ok and engines:
            from .trt import open_trt

            return "tensorrt", open_trt(engines, manifest.contracts, manifest.plugin_library(),
                                        dim_ranges(manifest.limits), cuda_graph=cuda_graph)
    if manifest.tp > 1:
        return "onnxruntime", _open_tp(manifest, backend, io_binding, threads)
    in_place = ort_fused and bool(manifest.graphs["decoder"].get("onnx_ort"))  # decoder.ort.onnx is opened
    mapped = () if ort_prepack else {"vision", "embed"} | ({"decoder"} if formats.is_dense else set())
    return "onnxruntime", open_ort(manifest.graph_paths(fused=ort_fused), manifest.contracts, io_binding=io_binding,
                                   threads=threads, cuda_graph=cuda_graph, kv_in_place=in_place,
                                   int4_accuracy_level=formats.accuracy_level, mapped=mapped, cache_dir=ort_cache)


def _open_tp(manifest, backend: str, io_binding: bool, threads: int) -> dict:
    """A --tp N artifact directory: vision and embed on ONNX Runtime in this process, the decoder over N rank
    processes (runtime/backends/tp.py)."""
    from .tp import TpDecoderSession

    paths = manifest.graph_paths(fused=True)
    sessions = open_ort({name: paths[name] for name in ("vision", "embed")}, manifest.contracts,
                        io_binding=io_binding, threads=threads, cuda_graph=False)
    sessions["decoder"] = TpDecoderSession(manifest, threads)
    return sessions
