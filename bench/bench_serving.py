"""Serving under load: run-to-completion batching vs in-flight batching, in the same run (issue 13).

  python bench/bench_serving.py --model-dir ARTIFACTS [--rates 1 2 4] [--requests 40] [--seed 0]
                                [--modes static inflight] [--image-fraction 0.3] [--lengths 16 64 256]

For each `--modes` entry a `qwen-vl-serve` (python -m qwen_vl_trt.runtime.serve.server --batching MODE) is started as a
child process on a free port, all before the load so that at each rate the modes run back to back. Then, for each
rate and mode, `--requests` chat requests arrive as a Poisson process (seeded exponential gaps, the same arrival
times and requests for every mode): a fraction `--image-fraction` carries a 448 px PNG as a data URL, the rest are
text; `max_tokens` is drawn from `--lengths`, greedy, `ignore_eos` so each request produces exactly max_tokens
tokens (the same work in both modes). Each request streams (SSE) on its own client thread; per request: TTFT =
first content chunk - send time, inter-token latency = gaps between content chunks. Per (mode, rate): request
throughput and output tok/s over the makespan (first send -> last end), TTFT and ITL p50 / p99 (numpy
percentiles, linear).

`--head-of-line`: a short text request (16 tokens) alone (TTFT median of 3), then one long request
(`--long-tokens`, text) and, 1 s after it started, the short one again: its TTFT behind the long one, and the long
one's median inter-token gap (one decode step) for scale.
Prints markdown rows with the command, machine and date.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, utc_now  # noqa: E402

TEXTS = ("Write a haiku about the sea.", "Describe a busy market in one paragraph.", "List three uses of copper.",
         "What is a GPU? Answer briefly.")


def start_server(model_dir: str, mode: str, max_batch: int | None) -> tuple[subprocess.Popen, str]:
    """The server as a child process on a free port -> (process, base URL); waits for its 'serving' line."""
    args = [sys.executable, "-m", "qwen_vl_trt.runtime.serve.server", "--model-dir", model_dir, "--port", "0",
            "--backend", "onnxruntime", "--batching", mode]
    args += ["--max-batch", str(max_batch)] if max_batch else []
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if line.startswith("serving "):
            base = line.split(" at ")[1].split()[0]
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain the log
            return proc, base
    raise RuntimeError(f"the server did not start (exit {proc.wait()})")


def image_url(seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(n: int, rate: float, seed: int, image_fraction: float, lengths) -> list[tuple[float, dict]]:
    """(send offset s, request body) x n: Poisson arrivals at `rate` req/s, a seeded mix of image/text and lengths."""
    rng = np.random.default_rng(seed)
    offsets = np.cumsum(rng.exponential(1.0 / rate, n))  # seconds after the start; the first after one gap
    img = image_url(seed)
    out = []
    for i, t in enumerate(offsets):
        text = TEXTS[i % len(TEXTS)]
        content = [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": text}] \
            if rng.random() < image_fraction else text
        out.append((float(t), {"messages": [{"role": "user", "content": content}], "temperature": 0,
                               "ignore_eos": True, "max_tokens": int(rng.choice(lengths)), "stream": True}))
    return out


def send(base: str, body: dict) -> dict:
    """One streamed request -> {"t0", "chunks": [arrival times of content chunks], "end", "status"}."""
    rec = {"t0": time.perf_counter(), "chunks": []}
    req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        rec["status"] = r.status
        for line in r:
            if line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
                rec["chunks"].append(time.perf_counter())
    rec["end"] = time.perf_counter()
    return rec


def run_load(base: str, work: list) -> list[dict]:
    records: list = [None] * len(work)
    start, threads = time.perf_counter(), []

    def client(i, body):
        records[i] = send(base, body)

    for i, (offset, body) in enumerate(work):
        time.sleep(max(0.0, start + offset - time.perf_counter()))
        threads.append(threading.Thread(target=client, args=(i, body)))
        threads[-1].start()
    for t in threads:
        t.join()
    return records


def summarize(records: list, work: list) -> dict:
    tokens = sum(body["max_tokens"] for _, body in work)
    span = max(r["end"] for r in records) - min(r["t0"] for r in records)
    ttft = [1e3 * (r["chunks"][0] - r["t0"]) for r in records]
    itl = [1e3 * g for r in records for g in np.diff(r["chunks"])]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"req_s": len(records) / span, "tok_s": tokens / span, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99), "span_s": span}


def head_of_line(base: str, long_tokens: int) -> dict:
    """A short request alone, then sent while a long one streams: its TTFT both times (median of 3 alone), and
    the long one's median gap (one decode step)."""
    long_body = {"messages": [{"role": "user", "content": TEXTS[1]}], "temperature": 0, "ignore_eos": True,
                 "max_tokens": long_tokens, "stream": True}
    short_body = {"messages": [{"role": "user", "content": TEXTS[0]}], "temperature": 0, "ignore_eos": True,
                  "max_tokens": 16, "stream": True}
    ttft = lambda rec: 1e3 * (rec["chunks"][0] - rec["t0"])  # noqa: E731
    alone = float(np.median([ttft(send(base, short_body)) for _ in range(3)]))
    holder: dict = {}
    thread = threading.Thread(target=lambda: holder.update(send(base, long_body)))
    thread.start()
    time.sleep(1.0)
    short = send(base, short_body)
    thread.join()
    return {"alone_ttft_ms": alone, "short_ttft_ms": ttft(short),
            "long_step_ms": 1e3 * float(np.median(np.diff(holder["chunks"])))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", choices=("static", "inflight"), default=["static", "inflight"])
    ap.add_argument("--image-fraction", type=float, default=0.3)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--max-batch", type=int)
    ap.add_argument("--head-of-line", action="store_true")
    ap.add_argument("--long-tokens", type=int, default=1000)
    args = ap.parse_args()
    print(f"`python bench/bench_serving.py {' '.join(sys.argv[1:])}`  \n{utc_now()}; {machine()}\n")
    print("| mode | rate req/s | requests | req/s done | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
          "ITL p99 ms | makespan s |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    servers = {}
    try:
        for mode in args.modes:  # all started up front: the modes then run back to back at each rate
            servers[mode] = start_server(args.model_dir, mode, args.max_batch)
            send(servers[mode][1], {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                    "stream": True})  # warm-up
        for rate in args.rates:
            work = workload(args.requests, rate, args.seed, args.image_fraction, args.lengths)
            for mode, (_, base) in servers.items():
                s = summarize(run_load(base, work), work)
                print(f"| {mode} | {rate:g} | {len(work)} | {s['req_s']:.2f} | {s['tok_s']:.1f} | "
                      f"{s['ttft_p50']:.0f} | {s['ttft_p99']:.0f} | {s['itl_p50']:.1f} | {s['itl_p99']:.1f} | "
                      f"{s['span_s']:.1f} |", flush=True)
        hol = {mode: head_of_line(base, args.long_tokens) for mode, (_, base) in servers.items()} \
            if args.head_of_line else {}
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    if hol:
        print("\n| mode | short request's TTFT alone, ms | its TTFT behind a long one, ms | one decode step of the "
              "long one, ms |\n|---|---|---|---|")
        for mode, h in hol.items():
            print(f"| {mode} | {h['alone_ttft_ms']:.0f} | {h['short_ttft_ms']:.0f} | {h['long_step_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
