"""bench/bench_cpu_peers.py's same-round ratios (`round_ratios`, `ratio_table`, `--ratios-of`) on hand-made runs
whose expected ratios are worked out here by hand: each round's best peer of the same kind (fp32 against the exact
peers, INT4 against the quantized ones), failed runs left out, medians and the rounds that meet each target."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_cpu_peers as bcp  # noqa: E402


def run(tok_s, ttft, startup, rss):
    return {"decode_tok_s": tok_s, "ttft_ms": ttft, "startup_s": startup, "peak_rss_gb": rss, "tokens": []}


RUNS = {
    # round 0: the best fp32 peer decodes at 10 (llama.cpp), the lowest TTFT is 1000 (onnxruntime-genai)
    # round 1: onnxruntime-genai failed; llama.cpp alone is the best
    # round 2: ours failed: no ratio
    "ours-fp32": [run(11.0, 900, 1.0, 4.0), run(9.6, 1100, 3.0, 4.0), {"error": "rc 1"}],
    "llamacpp-f32": [run(10.0, 1200, 2.0, 4.1), run(12.0, 1000, 1.5, 4.2), run(10.0, 1000, 1.0, 4.0)],
    "ortgenai-fp32": [run(8.0, 1000, 8.0, 5.0), {"error": "rc -9"}, run(9.0, 900, 9.0, 5.0)],
    # quantized: compared with llamacpp-q4_0 only (the fp32 peers are not its kind)
    "ours-int4": [run(60.0, 1300, 1.2, 1.5), run(66.0, 1400, 1.4, 1.5), run(70.0, 1200, 1.3, 1.5)],
    "llamacpp-q4_0": [run(50.0, 1500, 1.0, 1.8), run(60.0, 1300, 1.5, 1.8), run(70.0, 1250, 1.2, 1.8)],
}


def test_round_ratios_take_each_rounds_best_peer_of_the_kind():
    fp32 = bcp.round_ratios("ours-fp32", ["llamacpp-f32", "ortgenai-fp32"], RUNS)
    assert fp32["decode_tok_s"] == pytest.approx([11 / 10, 9.6 / 12])
    assert fp32["ttft_ms"] == pytest.approx([900 / 1000, 1100 / 1000])
    assert fp32["startup_s"] == pytest.approx([1.0 / 2.0, 3.0 / 1.5])
    assert fp32["peak_rss_gb"] == pytest.approx([4.0 / 4.1, 4.0 / 4.2])
    int4 = bcp.round_ratios("ours-int4", ["llamacpp-q4_0"], RUNS)
    assert int4["decode_tok_s"] == pytest.approx([60 / 50, 66 / 60, 70 / 70])


def test_ratio_table_rows_and_rounds_met():
    systems = [s for s in bcp.SYSTEMS if s.name in RUNS]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in bcp.ratio_table(systems, RUNS).splitlines()[2:]}
    fp32 = rows[next(s.label for s in systems if s.name == "ours-fp32")]
    cells = [c.strip() for c in fp32.strip("|").split("|")]
    assert cells[1] == "ortgenai-fp32, llamacpp-f32"  # the exact peers, in SYSTEMS order
    assert cells[2] == "0.95 (0.80-1.10) (1/2)"  # decode: median of 1.1 and 0.8; met in round 0 only
    assert cells[3] == "1.00 (0.90-1.10) (1/2)"  # TTFT 0.9 (met) and 1.1
    int4 = rows[next(s.label for s in systems if s.name == "ours-int4")]
    cells = [c.strip() for c in int4.strip("|").split("|")]
    assert cells[1] == "llamacpp-q4_0" and cells[2] == "1.10 (1.00-1.20) (3/3)"  # 1.0 counts as met (>= 1)


def test_ratios_of_a_saved_run(tmp_path):
    saved = tmp_path / "last-runs.json"
    saved.write_text(json.dumps({"runs": RUNS, "bandwidth": {}, "ref": []}))
    r = subprocess.run([sys.executable, str(ROOT / "bench/bench_cpu_peers.py"), "--ratios-of", str(saved)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 4 and "0.95 (0.80-1.10) (1/2)" in table[2] and "1.10 (1.00-1.20) (3/3)" in table[3]
