"""cuda-python's runtime API, as the backends use it: the module, its (err, *values) results checked, and device /
pinned host memory (TensorRT's static buffers, runtime/backends/trt.py and trt_io.py)."""
from __future__ import annotations

import numpy as np

from qwen_vl_trt.model.errors import BackendUnavailable

from .kv_cache import numpy_dtype


def cudart():
    """cuda-python's runtime API module (`cuda.bindings.runtime`, or `cuda.cudart` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def check(result):
    """cuda-python calls return (err, *values): raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendUnavailable(f"CUDA error {int(err)} ({err}); check the GPU and driver")
    return values[0] if len(values) == 1 else (values or None)


def _nbytes(shape, dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * numpy_dtype(dtype).itemsize


class DeviceBuffer:
    """A cudaMalloc'd buffer with its largest shape and dtype; freed when dropped."""

    def __init__(self, shape: tuple, dtype: str, cudart):
        self.shape, self.dtype, self.cudart = tuple(int(d) for d in shape), dtype, cudart
        self.nbytes = _nbytes(self.shape, dtype)
        self.ptr = int(check(cudart.cudaMalloc(max(self.nbytes, 1))))

    def __del__(self):
        if getattr(self, "ptr", None) is not None:
            self.cudart.cudaFree(self.ptr)


class DeviceView:
    """`shape` elements at `ptr` (the start of a static buffer): what a session's device outputs and the KV cache
    are. Valid as long as the owner lives; a session's output views hold until its next run."""

    def __init__(self, ptr: int, shape: tuple, dtype: str, owner=None):
        self.ptr, self.shape, self.dtype, self.owner = int(ptr), tuple(int(d) for d in shape), dtype, owner
        self.nbytes = _nbytes(self.shape, dtype)


class PinnedArray:
    """numpy array in page-locked host memory (cudaMallocHost): copies from / to it can run inside a CUDA graph."""

    def __init__(self, shape: tuple, dtype: str, cudart):
        import ctypes

        self.cudart, nbytes = cudart, max(_nbytes(shape, dtype), 1)
        self.ptr = int(check(cudart.cudaMallocHost(nbytes)))
        raw = (ctypes.c_byte * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, np.uint8)[:_nbytes(shape, dtype)].view(numpy_dtype(dtype)).reshape(shape)

    def __del__(self):
        if getattr(self, "ptr", None) is not None:
            self.cudart.cudaFreeHost(self.ptr)
