"""Every image decode in a worker process with a CPU-time, wall-clock and memory bound (issue 21: images that pass
the header check but are slow or heavy to parse).

PIL parses headers and metadata in Python while holding the interpreter lock, and its C decoders run as long as
the bytes ask: a 12 MB JPEG of 3 million empty APP1 segments took 13.5 s and +430 MiB in the server, and RSS
stayed up after. So the parent never parses untrusted image bytes itself:

1. `media_prechecks.precheck` refuses the known JPEG/PNG floods from their structure, in the parent, in
   milliseconds (segment, scan and chunk counts; file size against pixel count).
2. `probe` (the header size, for runtime/media_limits.py) and `decode` (the RGB pixels, `image_file.load_image`
   exactly) run in a pool of `POOL_SIZE` worker processes (runtime/decode_worker.py: PIL only, no numpy or
   torch). A job may use `BASE_SECONDS` of CPU time and `WALL_SECONDS` of wall-clock time until the header is
   read (an honest header parses in milliseconds), then `SECONDS_PER_PIXEL` more CPU time per pixel of the header
   size, and `WALL_PER_CPU_SECOND` times that more wall-clock time (an honest JPEG or PNG decodes, converts and
   is sent back in 40-55 ns a pixel measured in wall time on a loaded 2-core machine: 0.76 s for 16 Mpx, 3.4 s
   for 64 Mpx). CPU time is read from /proc every `POLL_SECONDS`. The pixels' budget is mostly CPU time, so
   that a busy machine, which slows an honest big image down but does not make it use more CPU, does not get it
   refused; a flood in a small image is stopped after 1 s at most. Address space is limited to
   `BYTES_PER_PIXEL` bytes a pixel + `MEMORY_SLACK` (RLIMIT_AS; PIL may hold the decoded image in a 4-byte layout, a transposed and an RGB copy and
   the 3-byte-a-pixel bytes sent back). A worker over its time is killed (SIGKILL) and replaced; one over its
   memory exits; either way the request gets an ImageError (400 in the server, one `error:` line in trt-run,
   INVALID_ARG in Triton).
3. The pixels come back as raw RGB bytes, never a pickle. Workers allocate image buffers with mmap
   (`MALLOC_MMAP_THRESHOLD_`), so freed pixels go back to the system at once, and a worker whose resident set
   is still above `RECYCLE_RSS` after a job is replaced.

Why processes and not threads: a thread cannot be stopped, and PIL holds the interpreter lock while it parses;
only a process can be killed on time and have its memory returned. The pool starts lazily, on the first image of
the process: `trt-run` without images never pays for it, and one with an image pays one interpreter start with
PIL (~0.1 s) for the same guard the server has (a file on disk is no more trusted than a request: it was
downloaded from somewhere).
"""
from __future__ import annotations

import atexit
import functools
import json
import mmap
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image

from qwen_vl_trt.model.errors import ImageError

from .image_file import is_bytes
from .media_prechecks import precheck

POOL_SIZE = 2
BASE_SECONDS = 0.5  # CPU seconds
SECONDS_PER_PIXEL = 80e-9  # CPU seconds
WALL_SECONDS = 1.0  # wall-clock seconds to read a header (its CPU budget is BASE_SECONDS)
WALL_PER_CPU_SECOND = 4  # wall-clock seconds per CPU second of the pixels' budget, beyond WALL_SECONDS
POLL_SECONDS = 0.02
BYTES_PER_PIXEL = 20
MEMORY_SLACK = 64 << 20
START_SECONDS = 30.0  # interpreter + PIL start on a busy machine
RECYCLE_RSS = 256 << 20


class OverPixelLimit(Exception):
    """`probe`: PIL's own check refused the header size (over twice `Image.MAX_IMAGE_PIXELS`)."""


class _Timeout(Exception):
    pass


class _Budget:
    """What a job may take, counted from its start: `cpu` seconds of the worker's CPU time (read from
    /proc/PID/stat) and `wall` seconds of wall-clock time."""

    def __init__(self, pid: int, cpu: float = BASE_SECONDS, wall: float = WALL_SECONDS):
        self.pid, self.cpu, self.wall, self.size = pid, cpu, wall, None
        self.t0, self.cpu0 = time.monotonic(), _cpu_seconds(pid)

    def grow_to(self, size: list) -> None:
        """The header says `size` (w, h): the budget of an image of that many pixels."""
        pixels_cpu = SECONDS_PER_PIXEL * size[0] * size[1]
        self.size, self.cpu = size, BASE_SECONDS + pixels_cpu
        self.wall = WALL_SECONDS + WALL_PER_CPU_SECOND * pixels_cpu

    def exceeded(self) -> bool:
        return time.monotonic() - self.t0 > self.wall or _cpu_seconds(self.pid) - self.cpu0 > self.cpu


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


class _Worker:
    """One decode_worker process and the bytes read from it so far."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)),
               # glibc: blocks over 256 KiB (image buffers) always come from mmap and go back to the system when
               # freed (by default the threshold grows with each large free, and the heap keeps them)
               "MALLOC_MMAP_THRESHOLD_": str(256 << 10)}
        self.proc = subprocess.Popen([_python(), "-m", "qwen_vl_trt.runtime.decode_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True)
        self.fd, self.buf = self.proc.stdout.fileno(), bytearray()

    def _wait(self, budget: _Budget) -> None:
        """Until the worker has written something; _Timeout when the job is over its budget first."""
        while not select.select([self.fd], [], [], POLL_SECONDS)[0]:
            if budget.exceeded():
                raise _Timeout

    def read_line(self, budget: _Budget) -> dict:
        while (end := self.buf.find(b"\n")) < 0:
            self._wait(budget)
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line = bytes(self.buf[:end])
        del self.buf[:end + 1]
        return json.loads(line)

    def read_bytes(self, n: int, budget: _Budget) -> bytearray:
        """The next `n` bytes, read straight into one buffer (the pixels of a big image are copied once)."""
        out = bytearray(n)
        got = min(n, len(self.buf))
        out[:got] = self.buf[:got]
        del self.buf[:got]
        view = memoryview(out)
        while got < n:
            self._wait(budget)
            k = os.readv(self.fd, [view[got:]])
            if not k:
                raise EOFError
            got += k
        return out

    def send(self, job: dict, payload) -> None:
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        if payload is not None:
            self.proc.stdin.write(payload)
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:  # a broken pipe's unflushed bytes: the process is gone anyway
                pass


def _python() -> str:
    """This interpreter; an embedding host (Triton's Python backend stub) may report itself instead."""
    exe = sys.executable
    if exe and os.access(exe, os.X_OK) and Path(exe).name.startswith("python"):
        return exe
    return shutil.which("python3") or exe


class DecodePool:
    """Up to `size` decode workers, started on first use; `probe` and `decode` take an idle one (or wait)."""

    def __init__(self, size: int = POOL_SIZE):
        self.size, self._idle, self._started, self._cond = size, [], 0, threading.Condition()

    def probe(self, source, name: str) -> tuple[int, int]:
        """(width, height) from the header of a path or bytes; (0, 0) for a missing / directory / empty path
        (`image_file.header_size`). ImageError for an unreadable or too slow header, OverPixelLimit."""
        result, _ = self._job("probe", source, name)
        if result.get("kind") == "pixels":
            raise OverPixelLimit(name)
        return tuple(result["size"])

    def decode(self, source, name: str | None = None) -> Image.Image:
        """`image_file.load_image(source, name)`, the same RGB pixels, decoded within the bounds of the module
        docstring; ImageError when the file is bad or over them."""
        result, data = self._job("decode", source, name or "<image bytes>")
        return Image.frombytes("RGB", tuple(result["size"]), data)

    def _job(self, op: str, source, name: str) -> tuple[dict, bytearray]:
        shown = name if is_bytes(source) else str(source)
        with _readable(source) as data:
            if data is not None:
                precheck(data, shown)
        job = {"op": op, "name": name, "path": None if is_bytes(source) else str(source),
               "nbytes": len(source) if is_bytes(source) else 0, "max_image_pixels": Image.MAX_IMAGE_PIXELS,
               "seconds": BASE_SECONDS, "seconds_per_pixel": SECONDS_PER_PIXEL, "bytes_per_pixel": BYTES_PER_PIXEL,
               "memory_slack": MEMORY_SLACK}
        worker = self._acquire()
        budget = _Budget(worker.proc.pid)
        try:
            worker.send(job, source if is_bytes(source) else None)
            while "header" in (result := worker.read_line(budget)):
                budget.grow_to(result["header"])
            data = worker.read_bytes(_checked_nbytes(result, budget.size), budget)
        except _Timeout:
            self._discard(worker)
            raise ImageError(f"image {shown} did not decode within its limit ({budget.cpu:.1f} s of CPU time, "
                             f"{budget.wall:.1f} s in all, for {_pixels(budget.size)}); re-encode it as a plain PNG "
                             "or JPEG") from None
        except (EOFError, OSError, ValueError):  # the worker died (CPU limit, a crash) or wrote garbage
            self._discard(worker)
            raise _over_limits(shown, budget.size) from None
        self._release(worker, result)
        if not result["ok"] and result["kind"] != "pixels":
            raise _over_limits(shown, budget.size) if result["kind"] == "memory" else ImageError(result["message"])
        return result, data

    def _acquire(self) -> _Worker:
        with self._cond:
            while not self._idle and self._started >= self.size:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._started += 1
            spare = self._started < self.size
        worker = self._start()
        if spare:  # so that a worker killed over its time leaves another one ready
            threading.Thread(target=self._start_spare, name="decode-pool-spare", daemon=True).start()
        return worker

    def _start(self) -> _Worker:
        """A new worker, ready for a job (the caller has counted it in `_started`)."""
        try:
            worker = _Worker()
            if worker.read_line(_Budget(worker.proc.pid, START_SECONDS, START_SECONDS)) != {"ready": True}:
                raise EOFError
        except (OSError, EOFError, ValueError, _Timeout) as e:
            self._forget()
            raise ImageError(f"the image decoder process did not start ({type(e).__name__}); check that "
                             f"`{_python()} -m qwen_vl_trt.runtime.decode_worker` runs") from None
        return worker

    def prestart(self) -> None:
        """Start one worker ahead of the first image (runtime/startup.py, while the sessions load), so that the
        first request does not wait for an interpreter and PIL to start (60-80 ms of a fresh process's first
        `prepare` on the 2-core machine, docs/benchmarks.md); nothing when one is already idle. A worker that
        cannot start is not reported here: the first image's `_acquire` tries again and says why."""
        with self._cond:
            if self._idle:
                return
        self._start_spare()

    def _start_spare(self) -> None:
        """Replace a killed worker at once, so that the next image does not wait for an interpreter to start."""
        with self._cond:
            if self._started >= self.size:
                return
            self._started += 1
        try:
            worker = self._start()
        except ImageError:
            return  # the next `_acquire` tries again and reports it
        self._release(worker, {})

    def _release(self, worker: _Worker, result: dict) -> None:
        if result.get("kind") == "memory" or result.get("rss", 0) > RECYCLE_RSS:
            self._discard(worker)
            return
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        self._forget()
        threading.Thread(target=self._start_spare, name="decode-pool-spare", daemon=True).start()

    def _forget(self) -> None:
        with self._cond:
            self._started -= 1
            self._cond.notify()

    def close(self) -> None:
        """Stop the idle workers (those in a job stop when it ends: their stdin closes with this process)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._started -= len(idle)
        for worker in idle:
            worker.kill()


class _readable:
    """The bytes to precheck: the bytes themselves, or an mmap of a regular non-empty file (else None: the
    worker's `image_file` functions say what is wrong with the path)."""

    def __init__(self, source):
        self.source, self.map = source, None

    def __enter__(self):
        if is_bytes(self.source):
            return self.source
        try:
            with open(self.source, "rb") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # missing, a directory, empty (mmap of 0 bytes), unreadable
            return None
        return self.map

    def __exit__(self, *exc):
        if self.map is not None:
            self.map.close()


def _checked_nbytes(result: dict, size) -> int:
    """The pixel bytes a final answer announces: 3 x the header's w x h for a decoded image, else 0 (ValueError
    otherwise: a worker that says something else is not trusted with the parent's memory)."""
    nbytes = result.get("nbytes", 0)
    if result.get("ok") and nbytes and (size is None or nbytes != 3 * size[0] * size[1]
                                        or list(result["size"]) not in (list(size), list(size)[::-1])):
        raise ValueError(f"the worker announced {nbytes} bytes for {size}")
    return nbytes


def _pixels(size) -> str:
    return "reading its header" if size is None else f"{size[0]}x{size[1]} pixels"


def _over_limits(name: str, size) -> ImageError:
    return ImageError(f"image {name} needs more memory or CPU time to decode than {_pixels(size)} may take; "
                      "re-encode it as a plain PNG or JPEG")


def prestart_in_background() -> None:
    """`pool().prestart()` on a daemon thread: a front-end calls this as it starts loading its model (trt-run's
    runtime/startup.py, the HTTP server's make_server), so the first image does not wait for a worker to start."""
    threading.Thread(target=pool().prestart, name="decode-pool-prestart", daemon=True).start()


@functools.lru_cache(maxsize=1)
def pool() -> DecodePool:
    """The process's decode pool (created on first use, its idle workers stopped at exit)."""
    decode_pool = DecodePool()
    atexit.register(decode_pool.close)
    return decode_pool
