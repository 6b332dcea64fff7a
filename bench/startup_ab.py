"""Start-up A/B of two checkouts on one artifact folder (issue 24): each checkout's bench/cpu_peers/run_ours.py in a
fresh process, the two alternated and their order swapped every round; start-up = spawn -> model ready (as
bench/cpu_peers/clock.py), peak RSS = wait4's ru_maxrss, plus TTFT and the first tokens (they must be equal).

  python bench/startup_ab.py ARTIFACTS ROUNDS --before /path/to/old/checkout --after . [--image IMG] [--tokens 4]
         [-- --option int4_activations=int8 ...]

Each checkout runs with its own .venv/bin/python. Not part of CI; on a busy machine report ratios and the load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ours_ab import run_once  # noqa: E402


def one(tree: Path, args, extra) -> tuple[float, float, float, list]:
    """(start-up s, peak RSS GB, TTFT ms, tokens) of one fresh run of `tree`'s runner (bench/ours_ab.py run_once)."""
    r = run_once(args.artifacts, args.image, args.tokens, {}, extra, python=tree / ".venv/bin/python",
                 runner=tree / "bench/cpu_peers/run_ours.py")
    return r["start_s"], r["peak_rss_gb"], r["ttft_ms"], r["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts")
    ap.add_argument("rounds", type=int)
    ap.add_argument("--before", required=True, type=Path)
    ap.add_argument("--after", required=True, type=Path)
    ap.add_argument("--image", default=str(Path.home() / ".cache/qwen-vl-trt-bench/grace_hopper_448.png"))
    ap.add_argument("--tokens", type=int, default=4)
    args, extra = ap.parse_known_args()
    extra = [x for x in extra if x != "--"]
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    res = {k: [] for k in trees}
    for i in range(args.rounds):
        for k in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
            load = open("/proc/loadavg").read().split()[0]
            s, rss, ttft, toks = one(trees[k], args, extra)
            res[k].append(s)
            print(f"round {i} {k}: start-up {s:.2f} s, peak RSS {rss:.2f} GB, TTFT {ttft:.0f} ms, tokens {toks}, "
                  f"load {load}", flush=True)
    for k, v in res.items():
        v = sorted(v)
        print(k, "median", round(v[len(v) // 2], 2), "range", round(v[0], 2), round(v[-1], 2))


if __name__ == "__main__":
    main()
