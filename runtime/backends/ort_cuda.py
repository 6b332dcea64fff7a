"""ONNX Runtime's CUDA provider: load its CUDA libraries, check in seconds that it really runs, and say which
provider a session ended up on.

Why: onnxruntime-gpu's `preload_dlls()` looks for the nvidia-* wheels next to its own package
(onnxruntime/__init__.py `_get_nvidia_dll_paths`, relative to `os.path.dirname(__file__)/..`), so an
onnxruntime-gpu unpacked elsewhere (bench/gpu_visit.sh: /tmp/ortsite) never finds torch's `nvidia/cu13/lib`,
and a process that does not import torch first (trt-run, the server) gets a CUDA provider that cannot load.
ONNX Runtime then creates the session on the CPU provider with only a log line, and
`get_available_providers()` still lists CUDA. `cuda.pathfinder` (NVIDIA's cuda-python, installed with
cuda-bindings) finds each library wherever the nvidia-* wheels, conda or CUDA_HOME put it.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import warnings

from qwen_vl_trt.model.errors import BackendUnavailable

CUDA = "CUDAExecutionProvider"
# what libonnxruntime_providers_cuda.so links (CUDA runtime, cuBLAS(Lt), cuRAND, cuFFT, NVRTC) and cuDNN, which
# it opens at run time; cublasLt before cublas (cublas needs it). onnxruntime/__init__.py `_get_nvidia_dll_paths`
CUDA_LIBRARIES = ("cudart", "cublasLt", "cublas", "curand", "cufft", "nvrtc", "cudnn")


def load_cuda_libraries() -> tuple[list[str], list[str]]:
    """dlopen the CUDA libraries ONNX Runtime's CUDA provider needs, found by cuda.pathfinder -> (loaded paths,
    problems). Without cuda.pathfinder: onnxruntime's own `preload_dlls()` (its messages go to stderr, never to
    stdout, which trt-run streams text to)."""
    try:
        from cuda import pathfinder
    except ImportError:
        return _ort_preload()
    loaded, problems = [], []
    for name in CUDA_LIBRARIES:
        try:
            loaded.append(str(pathfinder.load_nvidia_dynamic_lib(name).abs_path))
        except Exception as e:  # noqa: BLE001 -- DynamicLibNotFoundError and kin: reported, session creation decides
            wheel = _wheel_library(name)  # an older cuda.pathfinder may not know it (cuDNN)
            if wheel is None:
                problems.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            ctypes.CDLL(wheel, mode=ctypes.RTLD_GLOBAL)
            loaded.append(wheel)
    return loaded, problems


def _wheel_library(name: str) -> str | None:
    """lib<name>.so.<major> as an installed nvidia-* wheel lists it (importlib.metadata), or None."""
    import importlib.metadata as md
    import re

    pattern = re.compile(rf"lib{re.escape(name)}\.so\.\d+")
    for dist in md.distributions():
        if (dist.metadata["Name"] or "").lower().startswith("nvidia-"):
            found = next((f for f in dist.files or () if pattern.fullmatch(f.name)), None)
            if found is not None:
                return str(dist.locate_file(found))
    return None


def _ort_preload() -> tuple[list[str], list[str]]:
    import onnxruntime as ort

    if not hasattr(ort, "preload_dlls"):
        return [], ["onnxruntime has no preload_dlls and cuda.pathfinder is not installed"]
    with contextlib.redirect_stdout(sys.stderr):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 -- session creation then says what is missing
            return [], [f"onnxruntime.preload_dlls: {e}"]
    return [], []


def _one_node_model() -> bytes:
    """An Identity over a float [1] tensor: the smallest graph a provider must place."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "cuda_preflight", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def cuda_provider_status() -> tuple[bool, str]:
    """(True, "") when a session on the CUDA provider really runs there (loads the CUDA libraries first), else
    (False, why). Opens a one-node session and checks `get_providers()[0]`: `get_available_providers()` lists
    CUDA whenever onnxruntime-gpu is installed, whether or not its provider library can load."""
    import numpy as np
    import onnxruntime as ort

    where = f"onnxruntime {ort.__version__} ({ort.__file__})"
    if CUDA not in ort.get_available_providers():
        return False, f"{where} has no CUDA provider (the CPU build; install onnxruntime-gpu)"
    _, problems = load_cuda_libraries()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        with warnings.catch_warnings():  # "Specified provider ... is not in available provider names": said below
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(_one_node_model(), opts, providers=[CUDA, "CPUExecutionProvider"])
        sess.run(None, {"x": np.ones(1, np.float32)})
    except Exception as e:  # noqa: BLE001 -- any failure means: not usable
        return False, f"{where}: a CUDA session fails ({str(e).strip().splitlines()[0] if str(e).strip() else e!r})"
    if sess.get_providers()[0] != CUDA:
        missing = f"; CUDA libraries not found: {', '.join(problems)}" if problems else ""
        return False, (f"{where}: the CUDA provider did not load, a session falls back to "
                       f"{sess.get_providers()[0]}{missing}")
    return True, ""


def require_cuda_provider() -> None:
    """Raise BackendUnavailable (one line) unless ONNX Runtime's CUDA provider really runs."""
    ok, why = cuda_provider_status()
    if not ok:
        raise BackendUnavailable(f"--device cuda: {why}; not running on the CPU instead")


def providers_line(sessions: dict) -> str:
    """Where the sessions run, e.g. "CUDAExecutionProvider, CUDA graph on" (ONNX Runtime) or "TensorRT"."""
    found = sorted({s.provider for s in sessions.values()})
    return f"{'/'.join(found)}, CUDA graph {'on' if sessions['decoder'].graph_capture else 'off'}"


def require_on_gpu(sessions: dict) -> None:
    """Raise BackendUnavailable when an ONNX Runtime session runs on another provider than CUDA."""
    on_cpu = [name for name, s in sessions.items() if s.provider not in (CUDA, "TensorRT")]
    if on_cpu:
        first = sessions[on_cpu[0]].provider
        raise BackendUnavailable(f"--device cuda: ONNX Runtime runs the {', '.join(on_cpu)} graph(s) on {first}, "
                                 "not the CUDA provider (install onnxruntime-gpu with CUDA 13 / cuDNN 9 libraries)")
