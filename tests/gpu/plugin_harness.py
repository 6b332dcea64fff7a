"""Drive libqwen_vl_plugins.so's enqueue on torch CUDA tensors (no TensorRT library needed) + shared checks.

`PluginHarness.run(op, fields, inputs, outputs)` creates the plugin the way an engine would (build-phase
plugin -> getFieldsToSerialize -> runtime plugin -> attachToContext -> onShapeChange -> enqueue, see
pluginHarness.cpp) on the current torch stream, then synchronises.

Tolerances (|got - ref| <= atol + rtol * |ref|), references computed in fp32 from the same low-precision
inputs: the kernels accumulate in fp32, so the error is the final output rounding (fp16 2^-11, bf16 2^-8
relative) plus fp32 reordering (~1e-6); rtol is twice the rounding unit, atol covers outputs near zero.
The attention MMA path also rounds the softmax weights P to fp16/bf16 before P.V (as FlashAttention-2 does):
an error of at most half a rounding unit per weight, which averages out over keys and stays inside atol for
short segments (worst case: two keys, |v| ~ 4.5).
"""
from __future__ import annotations

import ctypes
import functools
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOLERANCES = {  # dtype -> (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2 * 2 ** -11),
    torch.bfloat16: (8e-3, 2 * 2 ** -8),
}
_TYPE = {torch.float32: b"f", torch.float16: b"h", torch.bfloat16: b"b", torch.int32: b"i",
         torch.float8_e4m3fn: b"8"}


class Int4Tensor:
    """An INT4 plugin input: `packed` uint8 CUDA tensor holding `shape`'s values two per byte, low nibble first."""

    def __init__(self, packed: torch.Tensor, shape):
        self.packed, self.shape = packed, tuple(shape)
        self.is_cuda = packed.is_cuda

    def is_contiguous(self) -> bool:
        return self.packed.is_contiguous()

    def dim(self) -> int:
        return len(self.shape)

    def data_ptr(self) -> int:
        return self.packed.data_ptr()


def build_plugin_library() -> Path:
    """plugins/build.sh's library, or a prebuilt one named by QWEN_VL_PLUGIN_LIB (bench/gpu_stage.sh builds it on
    the CPU machine for a GPU machine without nvcc or TensorRT headers)."""
    prebuilt = os.environ.get("QWEN_VL_PLUGIN_LIB")
    if prebuilt and Path(prebuilt).is_file():
        return Path(prebuilt)
    subprocess.run(["bash", str(ROOT / "plugins" / "build.sh")], check=True)
    return Path(prebuilt or ROOT / "build" / "plugins" / "libqwen_vl_plugins.so")


def build_harness() -> Path:
    """Compile pluginHarness.cpp against the headers plugins/build.sh fetched (or TENSORRT_ROOT); a prebuilt one
    named by QWEN_VL_HARNESS_LIB is used as it is."""
    prebuilt = os.environ.get("QWEN_VL_HARNESS_LIB")
    if prebuilt and Path(prebuilt).is_file():
        return Path(prebuilt)
    out = ROOT / "build" / "plugins" / "libqwen_vl_harness.so"
    src = Path(__file__).with_name("pluginHarness.cpp")
    if out.is_file() and out.stat().st_mtime > src.stat().st_mtime:
        return out
    inc = Path(os.environ["TENSORRT_ROOT"]) / "include" if os.environ.get("TENSORRT_ROOT") else \
        ROOT / "third_party" / "kernel_lens" / "include" / "tensorrt"
    subprocess.run(["nvcc", "-std=c++17", "-O2", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-isystem", str(inc),
                    "-shared", str(src), "-o", str(out), "-ldl"], check=True)
    return out


@functools.lru_cache(maxsize=1)
def harness() -> "PluginHarness":
    """The process-wide harness (builds the plugin library and the harness on first use)."""
    return PluginHarness(build_plugin_library(), build_harness())


ATTENTION_KERNELS = {"auto": 0, "simt": 1, "mma": 2}  # qwen_vl_set_attention_kernel codes (attentionMma.h)


class PluginHarness:
    def __init__(self, plugin_lib: Path, harness_lib: Path):
        self.plugin_lib = str(plugin_lib).encode()
        self.fn = ctypes.CDLL(str(harness_lib)).qwenHarnessEnqueue
        self.fn.restype = ctypes.c_int
        # The same dlopen handle the harness gets (same path), so the override reaches the plugins it creates.
        self._set_kernel = ctypes.CDLL(str(plugin_lib)).qwen_vl_set_attention_kernel
        self._set_kernel.argtypes = [ctypes.c_int32]
        self._set_kernel.restype = None

    def set_attention_kernel(self, kernel: str) -> None:
        """Attention path for every later launch in this process: auto (env / default), simt or mma.

        mma falls back to simt where the MMA path does not apply (fp32, head dims other than 64/72/80/128,
        sm < 80, KVCacheAttention with fewer than 16 new tokens)."""
        self._set_kernel(ATTENTION_KERNELS[kernel])

    def run(self, op: str, fields: dict, inputs: list, outputs: list[torch.Tensor],
            sync: bool = True) -> None:
        f_names = [k.encode() for k in fields]
        f_arrays = [np.ascontiguousarray(v, np.float32 if isinstance(v, float) or np.asarray(v).dtype.kind == "f"
                                         else np.int32).reshape(-1) for v in fields.values()]
        f_types = b"".join(b"f" if a.dtype == np.float32 else b"i" for a in f_arrays)
        for t in inputs + outputs:
            assert t.is_cuda and t.is_contiguous(), "plugin tensors must be contiguous CUDA tensors"

        def descs(ts):
            dims = np.zeros((max(len(ts), 1), 8), np.int64)
            for i, t in enumerate(ts):
                dims[i, : t.dim()] = t.shape
            ranks = (ctypes.c_int * len(ts))(*[t.dim() for t in ts])
            ptrs = (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])
            return ptrs, b"".join(b"4" if isinstance(t, Int4Tensor) else _TYPE[t.dtype] for t in ts), ranks, dims

        ip, it, ir, idims = descs(inputs)
        op_, ot, orr, odims = descs(outputs)
        err = ctypes.create_string_buffer(1024)
        rc = self.fn(self.plugin_lib, op.encode(), len(fields), (ctypes.c_char_p * len(f_names))(*f_names), f_types,
                     (ctypes.c_void_p * len(f_arrays))(*[a.ctypes.data for a in f_arrays]),
                     (ctypes.c_int * len(f_arrays))(*[a.size for a in f_arrays]),
                     len(inputs), ip, it, ir, idims.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
                     len(outputs), op_, ot, orr, odims.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
                     ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), err, len(err))
        assert rc == 0, err.value.decode()
        if sync:
            torch.cuda.synchronize()


@pytest.fixture(params=["simt", "mma"])
def attention_kernel(request):
    """Runs the test once per attention path (import it into a test module to use it); resets to auto after."""
    harness().set_attention_kernel(request.param)
    yield request.param
    harness().set_attention_kernel("auto")


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    atol, rtol = TOLERANCES[dtype]
    got, ref = got.float(), ref.float()
    excess = (got - ref).abs() - (atol + rtol * ref.abs())
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    worst = int(excess.argmax())
    idx = np.unravel_index(worst, tuple(got.shape))
    assert excess.flatten()[worst] <= 0, (f"{what}: worst at {idx}: got {got.flatten()[worst].item():.6g} "
                                          f"ref {ref.flatten()[worst].item():.6g} (atol {atol}, rtol {rtol})")
