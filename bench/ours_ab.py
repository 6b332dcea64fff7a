"""A/B of ours on the CPU: bench/cpu_peers/run_ours.py in fresh processes, variants alternated round by round.

  python bench/ours_ab.py ARTIFACTS IMAGE --variant NAME[:KEY=VALUE,...] [--variant ...] [--rounds 4] [--tokens 64]

A variant is a name and what it changes: `env.VAR=VALUE` sets an environment variable of the process (e.g.
`env.GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), any other KEY=VALUE is one of run_ours.py's `--option`s (e.g.
`prepack=0`, `ort_cache=off`). Each round runs every variant once, in the order given (the order is rotated every
round). Start-up = spawn -> model ready (bench/cpu_peers/clock.py, as bench_cpu_peers.py measures it), peak RSS =
wait4's ru_maxrss of the process, TTFT and decode tok/s from the runner's BENCH_RESULT line; per variant: every
run, then the median of each figure, and whether its tokens equal the first variant's. For an A/B of one variable
on a quiet machine; bench_cpu_peers.py is the comparison with the peers. bench/startup_ab.py runs two checkouts
through `run_once`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import machine, utc_now  # noqa: E402

MARK = "BENCH_RESULT "


def parse_variant(text: str) -> tuple[str, dict, list]:
    """"name:env.A=1,prepack=0" -> (name, {A: 1}, ["--option", "prepack=0"])."""
    name, _, spec = text.partition(":")
    env, options = {}, []
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key.startswith("env."):
            env[key[4:]] = value
        else:
            options += ["--option", f"{key}={value}"]
    return name, env, options


def run_once(artifacts: str, image: str, tokens: int, env: dict, options: list, *, python: str = sys.executable,
             runner: Path = HERE / "cpu_peers" / "run_ours.py") -> dict:
    """One fresh run_ours.py process (`runner`, run by `python`: another checkout's for bench/startup_ab.py),
    spawned and measured as bench_cpu_peers.py does (2 threads, 2 BLAS threads): its BENCH_RESULT plus start_s
    (spawn -> ready) and peak_rss_gb (wait4's ru_maxrss)."""
    cmd = [str(python), str(runner), artifacts, "--image", image, "--prompt", "Describe this image.",
           "--tokens", str(tokens), "--threads", "2", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", **env}
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # its own rusage: ru_maxrss = the process's peak RSS (KiB)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        lines = [line for line in fo.read().splitlines() if line.startswith(MARK)]
        if rc or not lines:
            raise SystemExit(f"{' '.join(cmd)} failed (rc {rc}):\n{fe.read()[-2000:]}")
    out = json.loads(lines[0][len(MARK):])
    out["start_s"] = out["ready_wall"] - t0
    out["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts")
    ap.add_argument("image")
    ap.add_argument("--variant", action="append", required=True, help="NAME[:KEY=VALUE,...] (module docstring)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    runs = {name: [] for name, _, _ in variants}
    print(f"# ours A/B -- {utc_now()}\nmachine: {machine()}\ncommand: python bench/ours_ab.py "
          + " ".join(sys.argv[1:]), flush=True)
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for name, env, options in order:
            res = run_once(args.artifacts, args.image, args.tokens, env, options)
            runs[name].append(res)
            print(f"round {r + 1} {name}: start-up {res['start_s']:.2f} s, TTFT {res['ttft_ms']:.0f} ms, "
                  f"decode {res['decode_tok_s']:.2f} tok/s, peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)
    first = runs[variants[0][0]][0]["tokens"]
    print("\n| variant | start-up s | TTFT ms | decode tok/s | peak RSS GB | tokens == first variant's |\n"
          "|---|---|---|---|---|---|")
    for name, env, options in variants:
        rs = runs[name]
        med = lambda key: statistics.median(x[key] for x in rs)  # noqa: E731
        same = all(x["tokens"] == first for x in rs)
        print(f"| {name} | {med('start_s'):.2f} | {med('ttft_ms'):.0f} | {med('decode_tok_s'):.2f} | "
              f"{med('peak_rss_gb'):.2f} | {'yes' if same else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
