"""runtime/backends/ort_cuda.py on a machine without a usable CUDA provider (issue 16, findings 4-6): the preflight says
so in one line instead of trusting `get_available_providers()`, a session that ONNX Runtime put on the CPU does not
claim CUDA-graph capture, and the CUDA libraries of the nvidia-* wheels load without importing torch.

The fallback is ONNX Runtime's own: `get_available_providers()` is made to list CUDA (as onnxruntime-gpu does
whether or not its provider library can load) and ONNX Runtime then creates the session on the CPU provider.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from qwen_vl_trt.export.export_all import export_all
from qwen_vl_trt.model.contracts import Limits


@pytest.fixture(scope="module")
def artifacts(qwen3_vl_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort_cuda_provider")
    export_all(qwen3_vl_ckpt, out, "fp32", Limits(max_batch=1, max_seq=128, max_cache_len=256))
    return out


@pytest.fixture
def cuda_listed(monkeypatch):
    """onnxruntime lists the CUDA provider, as onnxruntime-gpu does even when the provider cannot load."""
    import onnxruntime as ort

    assert "CUDAExecutionProvider" not in ort.get_available_providers(), "these tests describe a machine without CUDA"
    listed = ["CUDAExecutionProvider", *ort.get_available_providers()]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)


def test_preflight_on_the_cpu_build_says_so_in_one_line():
    import onnxruntime as ort

    from qwen_vl_trt.runtime.backends.ort_cuda import cuda_provider_status

    ok, why = cuda_provider_status()
    assert not ok and "\n" not in why
    assert why.startswith(f"onnxruntime {ort.__version__} (") and why.endswith(
        "has no CUDA provider (the CPU build; install onnxruntime-gpu)")


def test_preflight_sees_the_fallback_that_get_available_providers_hides(cuda_listed):
    from qwen_vl_trt.runtime.backends.ort_cuda import cuda_provider_status

    ok, why = cuda_provider_status()
    assert not ok and "\n" not in why
    assert "the CUDA provider did not load, a session falls back to CPUExecutionProvider" in why


def test_no_graph_capture_claimed_after_a_cpu_fallback(artifacts, cuda_listed):
    """Before: graph_capture was True whenever the session was created with enable_cuda_graph, even on the CPU."""
    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.runtime.backends.ort_cuda import providers_line
    from qwen_vl_trt.runtime.backends.ort import open_ort

    manifest = load_manifest(artifacts)
    sessions = open_ort(manifest.graph_paths(fused=True), manifest.contracts, cuda_graph=True)
    dec = sessions["decoder"]
    assert dec.sess.get_providers()[0] == "CPUExecutionProvider" and dec.device == "cpu"
    assert not dec.graph_capture and dec.new_graph_id() is None and dec.run_options(None) is None
    assert dec.graph_capture_error == "the CUDA provider did not load (CPUExecutionProvider runs)"
    assert providers_line(sessions) == "CPUExecutionProvider, CUDA graph off"


def test_cuda_libraries_of_the_nvidia_wheels_load_without_torch():
    """Where the nvidia-* wheels are installed (torch's CUDA 13 libraries in nvidia/cu13/lib), the runtime finds
    and loads them in a process that never imports torch; checked against the process's own memory map."""
    import importlib.metadata as md

    dist = md.distribution("nvidia-cuda-runtime")
    files = [f for f in dist.files if f.name.startswith("libcudart.so.")]
    assert files, "nvidia-cuda-runtime ships no libcudart"
    wheel_cudart = str(dist.locate_file(files[0]))
    code = textwrap.dedent("""
        import sys
        from qwen_vl_trt.runtime.backends.ort_cuda import load_cuda_libraries
        loaded, problems = load_cuda_libraries()
        assert "torch" not in sys.modules
        maps = open("/proc/self/maps").read()
        print("\\n".join(p for p in loaded if p in maps))
        print("problems:", problems)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    mapped = r.stdout.splitlines()
    assert wheel_cudart in mapped and "nvidia/cu13/lib" in wheel_cudart, (wheel_cudart, r.stdout)
    assert any("libcublasLt.so" in p for p in mapped) and any("libcudnn.so" in p for p in mapped), r.stdout
    assert mapped[-1] == "problems: []"


def test_a_library_cuda_pathfinder_does_not_know_comes_from_the_wheel(monkeypatch):
    """An older cuda.pathfinder without cuDNN: the nvidia-cudnn wheel's own file list gives libcudnn.so.9."""
    import importlib.metadata as md

    from cuda import pathfinder

    from qwen_vl_trt.runtime.backends.ort_cuda import load_cuda_libraries

    real = pathfinder.load_nvidia_dynamic_lib

    def without_cudnn(name):
        if name == "cudnn":
            raise pathfinder.DynamicLibNotFoundError("cudnn: unsupported here")
        return real(name)
    monkeypatch.setattr(pathfinder, "load_nvidia_dynamic_lib", without_cudnn)
    dist = md.distribution("nvidia-cudnn-cu13")
    wheel = next(str(dist.locate_file(f)) for f in dist.files if f.name.startswith("libcudnn.so."))
    loaded, problems = load_cuda_libraries()
    assert wheel in loaded and problems == []
