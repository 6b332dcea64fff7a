"""One import for both TensorRT flavours: full TensorRT (`tensorrt`) first, TensorRT-RTX (`tensorrt_rtx`) as fallback.

TensorRT-RTX's ONNX parser dlopen()s the unversioned `libtensorrt_rtx.so` when it imports a plugin node;
its wheel ships only `libtensorrt_rtx.so.1`. `ensure_rtx_soname()` adds the symlink inside the wheel's own
lib dir, and `rtx_env()` gives the LD_LIBRARY_PATH a subprocess needs (it must be set before the process
starts; see shared notes "tensorrt-on-these-machines").
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

_PLUGIN_HANDLES: dict[str, object] = {}


def import_tensorrt():
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("neither tensorrt nor tensorrt_rtx is installed")


def rtx_lib_dir() -> Path | None:
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def ensure_rtx_soname() -> Path | None:
    lib_dir = rtx_lib_dir()
    if lib_dir is None:
        return None
    link = lib_dir / "libtensorrt_rtx.so"
    if not link.exists() and (lib_dir / "libtensorrt_rtx.so.1").exists():
        try:
            link.symlink_to("libtensorrt_rtx.so.1")
        except OSError:
            pass
    return lib_dir


def rtx_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    lib_dir = ensure_rtx_soname()
    if lib_dir is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib_dir), env.get("LD_LIBRARY_PATH", "")]))
    return env


def plugin_library_path() -> Path:
    default = Path(__file__).resolve().parents[1] / "build" / "plugins" / "libqwen_vl_plugins.so"
    return Path(os.environ.get("QWEN_VL_PLUGIN_LIB", default))


def load_plugin_library(trt, path) -> object:
    """Load once per process and never deregister (deregistering under a live network crashes)."""
    key = str(path)
    if key not in _PLUGIN_HANDLES:
        _PLUGIN_HANDLES[key] = trt.get_plugin_registry().load_library(key)
    return _PLUGIN_HANDLES[key]
