"""bench/bench_pipeline.py --smoke: the GPU benchmark's code paths end to end on the CPU (tiny checkpoint, ONNX
Runtime CPU EP, HF eager). Checks the table's structure and that our greedy tokens equal HF's in it; never a
timing (no timing asserts: these machines are shared, their timings vary)."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAD = ("| config | metric | ours (ORT) | HF eager, dynamic cache | HF static cache + compile | ours / HF dynamic "
        "| ours / HF compiled |")
METRICS = ["vision encoder 64x64, ms", "vision encoder 128x128, ms", "TTFT 128x128 + 50 text tokens, ms",
           "decode tok/s, batch 1", "decode GB/s (% of copy), batch 1", "decode tok/s, batch 2",
           "decode GB/s (% of copy), batch 2", "decode tok/s, batch 1, ours without CUDA graph",
           "vision encoder 128x128, ms, ours with the plugin graphs (reference bodies, not *.ort.onnx)",
           "decode tok/s, batch 1, ours with the plugin graphs",
           "device memory in use at the end, GiB",
           "ours: vision / prefill / per-token decode / host per token, ms",
           "greedy tokens vs HF eager (8 new, same inputs)"]


def test_smoke_table_and_tokens_equal_hf(qwen3_vl_ckpt, tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "bench/bench_pipeline.py"), "--smoke", "--work", str(tmp_path),
                        "--checkpoint", str(qwen3_vl_ckpt), "--json", str(tmp_path / "out.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.perf_counter() - t0 < 60
    lines = r.stdout.splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    assert table[0] == HEAD and table[1] == "|" + "---|" * 7
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in table[2:]]
    assert [row[1] for row in rows] == METRICS and all(row[0] == "tiny" and len(row) == 7 for row in rows)
    by_metric = {row[1]: row for row in rows}
    for metric in METRICS[:7]:  # measured on both sides: numbers, and a ratio
        ours, hf, compiled, ratio = by_metric[metric][2], by_metric[metric][3], by_metric[metric][4], by_metric[metric][5]
        assert re.fullmatch(r"[0-9.]+( \([0-9]+%\))?", ours) and re.fullmatch(r"[0-9.]+( \([0-9]+%\))?", hf), metric
        assert re.fullmatch(r"[0-9.]+", ratio) and compiled in ("-", "not run"), metric
    assert by_metric[METRICS[7]][2] == "-"  # no CUDA graph on the CPU EP, nothing to compare
    for metric in METRICS[8:10]:  # the plugin graphs, measured on our side only
        assert re.fullmatch(r"[0-9.]+", by_metric[metric][2]) and by_metric[metric][3] == "-", metric
    assert re.fullmatch(r"[0-9.]+ / [0-9.]+ / [0-9.]+ / -?[0-9.]+", by_metric[METRICS[11]][2])
    agreement = by_metric[METRICS[12]][2]
    assert agreement.startswith("8/8 equal; first-step logits max abs diff ") and agreement.endswith("top-1 same")
    footer = "\n".join(lines[len(table):])
    for key in ("device: CPU", "copy bandwidth", "onnxruntime", "CPUExecutionProvider", "date: ", "command: "):
        assert key in footer, key
    assert (tmp_path / "out.json").is_file()


def test_smoke_int4_decoder(qwen3_vl_ckpt, tmp_path):
    """`--weights int4`: our side runs INT4 artifacts; the table says so. HF stays dense, so its greedy tokens
    are reported, not required to agree."""
    r = subprocess.run([sys.executable, str(ROOT / "bench/bench_pipeline.py"), "--smoke", "--work", str(tmp_path),
                        "--checkpoint", str(qwen3_vl_ckpt), "--weights", "int4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
    assert table[0] == HEAD.replace("| ours (ORT) |", "| ours (ORT, int4 decoder) |")
    assert (tmp_path / "art-tiny-int4" / "manifest.json").is_file()
    assert '"weights": "int4-rtn-sym-b128"' in (tmp_path / "art-tiny-int4" / "manifest.json").read_text()
