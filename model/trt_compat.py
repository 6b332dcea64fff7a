"""One import for both TensorRT flavours: full TensorRT (`tensorrt`) first, TensorRT-RTX (`tensorrt_rtx`) as fallback.

TensorRT-RTX's ONNX parser dlopen()s the unversioned `libtensorrt_rtx.so` when it imports a plugin node;
its wheel ships only `libtensorrt_rtx.so.1`. `ensure_rtx_soname()` adds the symlink inside the wheel's own
lib dir, and `rtx_env()` gives the LD_LIBRARY_PATH a subprocess needs (it must be set before the process
starts: the loader reads it once; without the symlink the process dies with "terminate called without an
active exception" right after the plugin node is created).

Having LD_LIBRARY_PATH right, three ways:
  * a parent process: `subprocess.run(cmd, env=rtx_env())` (what the tests do);
  * a script: call `reexec_with_rtx_env()` first thing in main(); it re-executes the interpreter once with
    the right LD_LIBRARY_PATH when needed (no-op when already set or when full TensorRT is installed);
  * a shell: `export LD_LIBRARY_PATH=$(python -m qwen_vl_trt.model.trt_compat)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}`.
Only the ONNX parser's plugin-node import needs it; loading the library and building without plugin
nodes work either way.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

_PLUGIN_HANDLES: dict[str, object] = {}


def import_tensorrt():
    """The `tensorrt` module if importable, else `tensorrt_rtx` (after ensuring its libtensorrt_rtx.so link)."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        pass
    ensure_rtx_soname()
    try:
        return importlib.import_module("tensorrt_rtx")
    except ImportError:
        raise ImportError("neither tensorrt nor tensorrt_rtx is installed") from None


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


def rtx_env_ready() -> bool:
    """True when no RTX workaround is needed or LD_LIBRARY_PATH already holds the RTX wheel's lib dir."""
    if importlib.util.find_spec("tensorrt") is not None:
        return True
    lib_dir = ensure_rtx_soname()
    return lib_dir is None or str(lib_dir) in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)


def reexec_with_rtx_env() -> None:
    """Re-execute this Python process once with rtx_env() when the RTX parser would need it (never returns then)."""
    if not rtx_env_ready() and os.environ.get("QWEN_VL_RTX_REEXEC") != "1":
        import sys

        env = rtx_env()
        env["QWEN_VL_RTX_REEXEC"] = "1"  # guard against a loop if the loader still misses the library
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def load_plugin_library(path=None, *, trt=None) -> object:
    """Load libqwen_vl_plugins.so (default: plugin_library_path()) into the global plugin registry, once per
    process and path; never deregistered (deregistering under a live network crashes). Returns the handle."""
    path = Path(path) if path is not None else plugin_library_path()
    key = str(path.resolve())
    if key not in _PLUGIN_HANDLES:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: plugin library missing; build it with `bash plugins/build.sh`")
        trt = trt or import_tensorrt()
        handle = trt.get_plugin_registry().load_library(key)
        if handle is None:
            raise RuntimeError(f"{path}: TensorRT could not load the plugin library (see the TensorRT log)")
        _PLUGIN_HANDLES[key] = handle
    return _PLUGIN_HANDLES[key]


if __name__ == "__main__":  # prints the directory to put on LD_LIBRARY_PATH (empty without TensorRT-RTX)
    print(ensure_rtx_soname() or "")
