"""Soak of qwen-vl-serve with hostile images mixed into normal traffic (issue 21, "Soak" target).

  python bench/soak_media.py --model-dir ARTIFACTS [--seconds 180] [--clients 16] [--hostile 4] [--max-tokens 16]

One `qwen-vl-serve` (inflight batching, ONNX Runtime) is started as a child process (bench_serving.start_server).
After one warm-up request, the RSS of the server's process tree (the server and its decode workers, psutil) is
read, then two phases of `--seconds` each run back to back on the same server:

1. normal only: `--clients - --hostile` client threads, each sending normal requests one after another (a 448 px
   PNG as a data URL + a prompt, greedy, `--max-tokens` tokens, ignore_eos, not streamed);
2. mixed: the same normal clients and `--hostile` clients beside them, cycling through the parser
   floods of tests/media_bombs.py (JPEG of 3 M / 11 M empty APP1 segments: 16 / 58.7 MB bodies, progressive JPEG
   with 60,000 repeated scans, PNG with 1 M empty chunks, GIF with 3 M empty comments, BMP with 4 M no-op RLE
   escapes).

Reported: normal end-to-end latency p50 / p99 per phase and their ratio (target: mixed p99 <= 1.5 x normal-only),
the hostile answers by status with their slowest time (which includes waiting for one of the server's
`--max-concurrent-requests` slots behind normal requests), failed normal requests, and the tree's RSS after the
warm-up request, after the normal-only phase (the server warmed up to full batches: the "before" of the
target), at its peak in the mixed phase (sampled every 50 ms) and 5 s after it (target: back within 100 MiB of
the normal-only level).
Prints a markdown row with the command, machine and date.
"""
from __future__ import annotations

import argparse
import base64
import itertools
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # media_bombs: the hostile images the tests use
import media_bombs  # noqa: E402
from bench_serving import image_url, start_server  # noqa: E402
from benchlib import machine, utc_now  # noqa: E402

FLOODS = {
    "jpeg_app1_12MB": lambda: media_bombs.jpeg_app1_flood(3_000_000),
    "jpeg_app1_44MB": lambda: media_bombs.jpeg_app1_flood(11_000_000),
    "jpeg_scans": lambda: media_bombs.jpeg_scan_flood(60_000),
    "png_chunks": lambda: media_bombs.png_chunk_flood(1_000_000),
    "gif_comments": lambda: media_bombs.gif_comment_flood(3_000_000),
    "bmp_rle": lambda: media_bombs.bmp_rle_flood(4_000_000),
}


def chat_body(url: str, max_tokens: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                 {"type": "text", "text": "Describe this image."}]}],
                       "temperature": 0, "ignore_eos": True, "max_tokens": max_tokens}).encode()


def post(base: str, body: bytes) -> tuple[int, float]:
    """One non-streamed chat request -> (HTTP status, seconds to the whole answer)."""
    req = urllib.request.Request(base + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        e.read()
        status = e.code
    except OSError:
        status = 0  # connection refused / reset: a failure
    return status, time.perf_counter() - t0


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_phase(base: str, seconds: float, normal_clients: int, hostile_clients: int, hostile_bodies: list,
              normal_body: bytes, pid: int) -> dict:
    """Clients loop until `seconds` have passed -> normal latencies, hostile (name, status, s), peak tree RSS."""
    stop_at = time.perf_counter() + seconds
    normal, hostile, peak = [], [], [tree_rss(pid)]

    def normal_client():
        while time.perf_counter() < stop_at:
            normal.append(post(base, normal_body))

    def hostile_client(offset: int):
        for name, body in itertools.islice(itertools.cycle(hostile_bodies), offset, None):
            if time.perf_counter() >= stop_at:
                return
            status, s = post(base, body)
            hostile.append((name, status, s))

    def sample():
        while time.perf_counter() < stop_at:
            peak.append(tree_rss(pid))
            time.sleep(0.05)

    threads = [threading.Thread(target=normal_client) for _ in range(normal_clients)]
    threads += [threading.Thread(target=hostile_client, args=(i,)) for i in range(hostile_clients)]
    threads += [threading.Thread(target=sample)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"normal": normal, "hostile": hostile, "peak_rss": max(peak)}


def latency(records: list) -> dict:
    ok = [s for status, s in records if status == 200]
    pct = lambda q: float(np.percentile(ok, q)) if ok else float("nan")  # noqa: E731
    return {"n": len(records), "failed": len(records) - len(ok), "p50_s": pct(50), "p99_s": pct(99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--seconds", type=float, default=180.0, help="length of each phase (default: 180)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--hostile", type=int, default=4, help="hostile clients in the mixed phase (default: 4)")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    hostile_bodies = [(name, chat_body("data:image/jpeg;base64," + base64.b64encode(make()).decode(), 1))
                      for name, make in FLOODS.items()]
    normal_body = chat_body(image_url(0), args.max_tokens)
    proc, base = start_server(args.model_dir, "inflight", None)
    try:
        assert post(base, normal_body)[0] == 200, "the warm-up request failed"
        rss_before = tree_rss(proc.pid)
        only = run_phase(base, args.seconds, args.clients - args.hostile, 0, [], normal_body, proc.pid)
        rss_between = tree_rss(proc.pid)
        mixed = run_phase(base, args.seconds, args.clients - args.hostile, args.hostile, hostile_bodies, normal_body,
                          proc.pid)
        time.sleep(5.0)
        rss_after = tree_rss(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    report(args, only, mixed, rss_before, rss_between, rss_after)
    return 0


def report(args, only: dict, mixed: dict, rss_before: int, rss_between: int, rss_after: int) -> None:
    a, b = latency(only["normal"]), latency(mixed["normal"])
    by_status: dict = {}
    for name, status, s in mixed["hostile"]:
        by_status.setdefault(status, []).append(s)
    hostile = {status: {"n": len(xs), "max_s": round(max(xs), 2)} for status, xs in sorted(by_status.items())}
    mib = lambda n: round(n / 2**20)  # noqa: E731
    summary = {"normal_only": a, "mixed": b, "p99_ratio": b["p99_s"] / a["p99_s"], "hostile_by_status": hostile,
               "rss_mib": {"after_warm_up": mib(rss_before), "after_normal_only": mib(rss_between),
                           "peak_mixed": mib(mixed["peak_rss"]), "5s_after_mixed": mib(rss_after)}}
    print(json.dumps(summary, indent=1))
    print(f"\ncommand: python bench/soak_media.py {' '.join(sys.argv[1:])}\nmachine: {machine()}\ndate: {utc_now()}")
    answers = ", ".join(f"{status}: {v['n']} (max {v['max_s']} s)" for status, v in hostile.items())
    print("| phase s | clients (hostile) | normal p99 only / mixed (s) | ratio | normal failed | hostile answers "
          "| RSS warm-up / normal-only / mixed peak / after (MiB) |")
    print(f"| {args.seconds:g} | {args.clients} ({args.hostile}) | {a['p99_s']:.2f} / {b['p99_s']:.2f} | "
          f"{summary['p99_ratio']:.2f} | {a['failed']} + {b['failed']} | {answers} | "
          f"{mib(rss_before)} / {mib(rss_between)} / {mib(mixed['peak_rss'])} / {mib(rss_after)} |")


if __name__ == "__main__":
    sys.exit(main())
