"""bench/profile_decode_step.py `decode_runs_from`: the decode steps are the decoder's runs after the prefill, whether
or not a warm-up run on zeros came first (runtime/backends/ort.py OrtSession.warm_up, for MatMulF32 / MatMulInt4
decoders). Counting the prefill as a step inflated every product's time by its share of the prefill GEMM."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import profile_decode_step  # noqa: E402

PREFILL = (100, 700)  # (start, end) us: 600 us, the longest by far
STEPS = [(800, 870), (900, 975), (1000, 1068)]


def test_without_a_warm_up_the_steps_follow_the_first_run():
    runs = [PREFILL, *STEPS]
    assert runs[profile_decode_step.decode_runs_from(runs):] == STEPS


def test_a_warm_up_run_before_the_prefill_is_not_a_step():
    runs = [(0, 40), PREFILL, *STEPS]
    assert runs[profile_decode_step.decode_runs_from(runs):] == STEPS
