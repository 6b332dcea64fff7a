"""Export time and peak RSS for a random-weight checkpoint with a released Qwen3-VL config (a script).

  python bench/bench_export_memory.py [--config 8B] [--work /tmp/qwen-vl-export-bench] [--keep] [--cold]

Makes the checkpoint with bench/make_random_checkpoint.py (or reuses WORK/ckpt-<config> if complete), then
runs `python -m qwen_vl_trt.export.cli CKPT OUT --dtype bf16` as a child process and measures:
- wall time of the export;
- peak RSS of the child: ru_maxrss from os.wait4 (the kernel's high-water mark of VmRSS, exact);
- peak RssAnon / RssFile of the child, sampled from /proc/<pid>/status every 50 ms (RSS counts the
  file pages of mmap'd safetensors shards that were touched; RssAnon is the process's own memory);
- the largest single tensor and the checkpoint size (from the safetensors headers), the graphs' size.
Prints one markdown table row, the command, the machine and the date. Deletes WORK unless --keep.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 1 << 30


def safetensors_sizes(ckpt: Path) -> tuple[int, int, str]:
    """(total tensor bytes, largest tensor bytes, largest key) from the shard headers."""
    total, largest, largest_key = 0, 0, ""
    for p in sorted(ckpt.glob("*.safetensors")):
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for key, v in header.items():
            a, b = v["data_offsets"]
            total += b - a
            if b - a > largest:
                largest, largest_key = b - a, key
    return total, largest, largest_key


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    return f"{os.cpu_count()} cores ({cpu}), {mem / GiB:.1f} GiB RAM, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


class StatusSampler(threading.Thread):
    """Peaks of VmRSS / RssAnon / RssFile of one pid, read from /proc/<pid>/status."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.at_peak_anon: dict = {}
        self.stop = threading.Event()

    def run(self):
        path = f"/proc/{self.pid}/status"
        while not self.stop.is_set():
            try:
                text = open(path).read()
            except OSError:
                return
            vals = {}
            for line in text.splitlines():
                k, _, v = line.partition(":")
                if k in self.FIELDS:
                    vals[k] = int(v.split()[0]) * 1024
            for k, v in vals.items():
                self.peak[k] = max(self.peak[k], v)
            if vals.get("RssAnon", 0) >= self.peak["RssAnon"]:
                self.at_peak_anon = vals
            time.sleep(self.period)


def run_export(ckpt: Path, out: Path, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "qwen_vl_trt.export.cli", str(ckpt), str(out), "--dtype", dtype]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    sampler = StatusSampler(proc.pid)
    sampler.start()
    lines = []
    for line in proc.stderr:  # progress lines ("exported decoder.onnx in 312.4 s")
        sys.stderr.write("  [export] " + line)
        lines.append(line.rstrip())
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"export failed (exit {rc}): {' '.join(cmd)}\n" + "\n".join(lines[-20:]))
    return {"cmd": cmd, "wall_s": wall, "maxrss": usage.ru_maxrss * 1024, "peaks": sampler.peak,
            "at_peak_anon": sampler.at_peak_anon, "progress": lines}


def drop_file_cache(ckpt: Path) -> None:
    """Evict the checkpoint's pages from the page cache (only these files): a cold-cache export."""
    for p in ckpt.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="8B", help="2B, 4B, 8B or 32B (bench/make_random_checkpoint.py)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--work", default="/tmp/qwen-vl-export-bench")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the graphs")
    ap.add_argument("--cold", action="store_true",
                    help="evict the checkpoint files from the page cache before the export (posix_fadvise)")
    args = ap.parse_args(argv)

    work = Path(args.work)
    ckpt, out = work / f"ckpt-{args.config}", work / f"onnx-{args.config}"
    make_s = None
    if not (ckpt / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / "make_random_checkpoint.py"), args.config, str(ckpt),
                        "--dtype", args.dtype], check=True)
        make_s = time.perf_counter() - t0
    else:
        print(f"reusing {ckpt}", file=sys.stderr)
    if out.exists():
        shutil.rmtree(out)
    try:
        total, largest, largest_key = safetensors_sizes(ckpt)
        if args.cold:
            drop_file_cache(ckpt)
        r = run_export(ckpt, out, args.dtype)
        graphs = dir_bytes(out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    p = r["peaks"]
    print()
    print("| config | checkpoint GB | largest tensor GB | export s | peak RSS GiB | peak RssAnon GiB (sampled) "
          "| peak RssFile GiB (sampled) | graphs GB |")
    print("|---|---|---|---|---|---|---|---|")
    variant = ", cold cache" if args.cold else ""
    print(f"| Qwen3-VL-{args.config} ({args.dtype}, random{variant}) | {total / 1e9:.2f} | {largest / 1e9:.2f} "
          f"| {r['wall_s']:.0f} | {r['maxrss'] / GiB:.2f} | {p['RssAnon'] / GiB:.2f} | {p['RssFile'] / GiB:.2f} "
          f"| {graphs / 1e9:.2f} |")
    print()
    print(f"largest tensor: {largest_key} ({largest / GiB:.2f} GiB); target 2 GiB + largest = "
          f"{(2 * GiB + largest) / GiB:.2f} GiB")
    print(f"/proc status at peak RssAnon: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in r["at_peak_anon"].items()))
    for line in r["progress"]:
        print(f"  {line}")
    if make_s is not None:
        print(f"checkpoint written in {make_s:.0f} s (bench/make_random_checkpoint.py {args.config})")
    print(f"bench: python bench/bench_export_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"command: {' '.join(['python', '-m', 'qwen_vl_trt.export.cli', 'CKPT', 'OUT', '--dtype', args.dtype])}"
          )
    print(f"machine: {machine()}")
    print(f"date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
