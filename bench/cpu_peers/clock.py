"""What every runner of bench_cpu_peers.py measures, the same way, in the system's own process (stdlib only: it is
imported by the peers' venvs too).

  clock = RunClock()            # at import of the runner, after the interpreter started
  ...load the model...
  clock.ready()                 # the sessions / pipeline exist: start-up ends here
  clock.request()               # the request starts (image read, preprocessing, vision, prefill follow)
  clock.token(token_id)         # once per generated token, as soon as the system hands it out
  clock.emit(extra)             # one line `BENCH_RESULT {json}` on stdout for bench_cpu_peers.py

Start-up is measured by the parent: from just before it spawns the process (wall clock) to `ready` (wall clock),
so it includes the interpreter, the imports and the session creation. TTFT: `request` -> first token.
Decode tok/s: (n - 1) / (last token - first token).
"""
from __future__ import annotations

import json
import sys
import time

MARK = "BENCH_RESULT "


class RunClock:
    def __init__(self):
        self.ready_wall = None
        self.t_request = None
        self.token_ids: list[int] = []
        self.token_times: list[float] = []

    def ready(self) -> None:
        self.ready_wall = time.time()

    def request(self) -> None:
        self.t_request = time.perf_counter()

    def token(self, token_id: int) -> None:
        self.token_times.append(time.perf_counter())
        self.token_ids.append(int(token_id))

    def emit(self, extra: dict | None = None) -> None:
        t = self.token_times
        n = len(t)
        out = {"ready_wall": self.ready_wall, "tokens": self.token_ids,
               "ttft_ms": 1e3 * (t[0] - self.t_request) if n else None,
               "decode_tok_s": (n - 1) / (t[-1] - t[0]) if n > 1 and t[-1] > t[0] else None}
        out.update(extra or {})
        sys.stdout.write(MARK + json.dumps(out) + "\n")
        sys.stdout.flush()


def common_args(argv=None):
    """The arguments every runner takes: artifact dir, image, prompt, new tokens, threads."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts")
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--option", action="append", default=[], help="KEY=VALUE, runner-specific")
    args = ap.parse_args(argv)
    args.options = dict(o.split("=", 1) for o in args.option)
    return args
