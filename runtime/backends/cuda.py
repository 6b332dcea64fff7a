"""cuda-python's runtime API, as the backends use it: the module, and its (err, *values) results checked."""
from __future__ import annotations

from qwen_vl_trt.model.errors import BackendUnavailable


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
