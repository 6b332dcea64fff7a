"""Helpers shared by the bench scripts (not a test module): machine line, medians, ONNX Runtime call timing and
profiling hooks that need no change in the runtime.

- `OrtCalls`: a context manager that wraps `onnxruntime.InferenceSession.run` / `run_with_iobinding` at the class
  level and records (session, start, seconds) of every call, so a bench can split a loop's wall time into time
  inside ONNX Runtime calls and host Python outside them, whatever the runtime code calls.
- `ort_profiling()`: while active, every new InferenceSession is created with `enable_profiling`; `node_counts(sess)`
  ends its profile and returns the number of graph nodes each run executed (on a GPU without CUDA graphs, about
  one kernel launch each). Its per-node durations are not used: at tiny sizes the profiler's own cost per node
  (~5 us here) exceeds the kernels it times.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def ensure_importable(root: Path) -> None:
    """Make `qwen_vl_trt` importable from the checkout at `root` when it is not installed (the GPU machine, which
    reaches no package index): a namespace folder in the temp dir links export/, model/ and runtime/, and goes on sys.path
    and PYTHONPATH (for the subprocesses: export_all.sh, make_random_checkpoint.py)."""
    try:
        importlib.import_module("qwen_vl_trt.runtime")
        return
    except ImportError:
        for name in [m for m in sys.modules if m == "qwen_vl_trt" or m.startswith("qwen_vl_trt.")]:
            del sys.modules[name]
    pkg = Path(tempfile.gettempdir()) / "qwen_vl_trt_shim" / "qwen_vl_trt"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("export", "model", "runtime"):  # model/: qwen_vl_trt.model, shared by export and runtime
        if not (pkg / name).exists():
            (pkg / name).symlink_to(Path(root).resolve() / name)
    sys.path.insert(0, str(pkg.parent))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(pkg.parent), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    importlib.import_module("qwen_vl_trt.runtime")


def machine() -> str:
    cpu, mem = "unknown CPU", 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {mem / (1 << 30):.1f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_images(work: Path, sizes) -> dict:
    """size -> path of a random RGB PNG of size x size (seeded; reused when already there)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = {}
    for s in sizes:
        paths[s] = Path(work) / f"image-{s}.png"
        if not paths[s].is_file():
            Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(paths[s])
    return paths


def median_ms(fn, repeat: int = 20, warmup: int = 2) -> float:
    """Median wall time of `fn()` in ms (host work only; no device synchronization)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


class OrtCalls(contextlib.AbstractContextManager):
    """Records every InferenceSession.run / run_with_iobinding call: `calls` = [(session, t_start, seconds)]."""

    def __init__(self):
        self.calls: list[tuple[object, float, float]] = []

    def __enter__(self):
        import onnxruntime as ort

        self._cls = ort.InferenceSession
        self._saved = {name: getattr(self._cls, name) for name in ("run", "run_with_iobinding")}
        for name, fn in self._saved.items():
            setattr(self._cls, name, self._timed(fn))
        return self

    def _timed(self, fn):
        calls = self.calls

        def wrapper(sess, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(sess, *args, **kwargs)
            finally:
                calls.append((sess, t0, time.perf_counter() - t0))
        return wrapper

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self._cls, name, fn)
        return False

    def after_first_call_of(self, sess) -> list[tuple[object, float, float]]:
        """The calls made after the first call on `sess` (e.g. the decode phase after the prefill call)."""
        first = next(i for i, c in enumerate(self.calls) if c[0] is sess)
        return self.calls[first + 1:]


@contextlib.contextmanager
def ort_profiling(directory: str | Path):
    """Sessions created inside this block profile every run into `directory`."""
    import onnxruntime as ort

    cls = ort.InferenceSession
    saved = cls.__init__
    Path(directory).mkdir(parents=True, exist_ok=True)

    def init(self, path_or_bytes, sess_options=None, *args, **kwargs):
        sess_options = sess_options or ort.SessionOptions()
        sess_options.enable_profiling = True
        sess_options.profile_file_prefix = str(Path(directory) / f"ort_{len(os.listdir(directory))}")
        saved(self, path_or_bytes, sess_options, *args, **kwargs)

    cls.__init__ = init
    try:
        yield
    finally:
        cls.__init__ = saved


def node_counts(sess) -> list[int]:
    """End the profile of an InferenceSession created under `ort_profiling`: nodes executed per run, in order."""
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
                  and e.get("name") == "model_run")
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
    return [int(np.searchsorted(starts, end, "right") - np.searchsorted(starts, start, "left")) for start, end in runs]
