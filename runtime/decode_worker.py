"""The decode worker: a child process that parses untrusted image bytes for runtime/media_guard.py.

Run as `python -m qwen_vl_trt.runtime.decode_worker`; it imports PIL and runtime/image_file.py only (no numpy, no
torch). Protocol on stdin/stdout, one job at a time, no pickle in either direction (a worker compromised by a
hostile file must not be able to run code in the parent by what it sends back):

    parent -> worker: one JSON line {"op": "probe" | "decode", "name", "path" | null, "nbytes",
                      "max_image_pixels", "seconds", "seconds_per_pixel", "bytes_per_pixel", "memory_slack"},
                      then `nbytes` bytes of encoded image (none when "path" is given)
    worker -> parent: "ready" line once at start; per job, for "decode" first {"header": [w, h]} once the
                      header is read, then the last line {"ok": true, "size": [w, h], "nbytes": n, "rss": r}
                      followed by n bytes (RGB, row-major) for "decode", or {"ok": false, "kind":
                      "image" | "pixels" | "memory", "message": ...}

Each job runs under `RLIMIT_AS` and `RLIMIT_CPU`: while the header is parsed, `memory_slack` bytes of address
space above what the worker maps with the job's bytes read and `seconds` of CPU; once the header says w x h,
`bytes_per_pixel * w * h + memory_slack` and `seconds + seconds_per_pixel * w * h` (then SIGXCPU ends the
process). The parent's wall-clock deadline (runtime/media_guard.py) is the bound that holds in every case; these
two stop a runaway parser from growing or spinning unseen. After a MemoryError the worker exits and the parent
starts a fresh one.
"""
from __future__ import annotations

import json
import os
import resource
import sys

from PIL import Image

from qwen_vl_trt.model.errors import ImageError

from .image_file import header_size, load_image


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _limit(job: dict, pixels: int) -> None:
    """The job's CPU and address-space limits for an image of `pixels` (0 before its header is read)."""
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    seconds = job["seconds"] + job["seconds_per_pixel"] * pixels
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu.ru_utime + cpu.ru_stime + seconds) + 2, resource.RLIM_INFINITY))
    memory = _vm_bytes() + job["bytes_per_pixel"] * pixels + job["memory_slack"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, resource.RLIM_INFINITY))


def _run(job: dict, payload: bytes | None, send) -> tuple[dict, bytes]:
    source = job["path"] if job["path"] is not None else payload
    Image.MAX_IMAGE_PIXELS = job["max_image_pixels"]
    if job["op"] == "probe":
        try:
            size = header_size(source, job["name"])
        except Image.DecompressionBombError:
            return {"ok": False, "kind": "pixels", "message": ""}, b""
        return {"ok": True, "size": list(size), "nbytes": 0}, b""
    def on_header(size: tuple[int, int]) -> None:
        _limit(job, size[0] * size[1])
        send({"header": list(size)})

    img = load_image(source, job["name"], on_header=on_header)
    data = img.tobytes()
    return {"ok": True, "size": list(img.size), "nbytes": len(data)}, data


def main() -> None:
    out = os.fdopen(os.dup(1), "wb")  # the protocol's channel; fd 1 itself goes to /dev/null, so a stray
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # print in a library cannot corrupt it
    stdin = sys.stdin.buffer

    def send(obj: dict, data: bytes = b"") -> None:
        out.write(json.dumps(obj).encode() + b"\n")
        if data:
            out.write(data)
        out.flush()

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU would dump core in the server's directory
    send({"ready": True})
    while line := stdin.readline():
        job = json.loads(line)
        payload = stdin.read(job["nbytes"]) if job["nbytes"] else None
        _limit(job, 0)
        try:
            result, data = _run(job, payload, send)
        except ImageError as e:
            result, data = {"ok": False, "kind": "image", "message": str(e)}, b""
        except MemoryError:
            send({"ok": False, "kind": "memory", "message": ""})
            return
        except Exception as e:  # noqa: BLE001 - a decoder bug on hostile bytes is this image's error, not ours
            result, data = {"ok": False, "kind": "image", "message": f"cannot read image {job['name']}: the "
                            f"decoder failed ({type(e).__name__}); re-export it as PNG or JPEG"}, b""
        del payload
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        result["rss"] = _rss_bytes()
        send(result, data)


if __name__ == "__main__":
    main()
