"""bench/bench_pipeline.py --smoke: the GPU benchmark's code paths end to end on the CPU (tiny checkpoint, ONNX
Runtime CPU EP, HF eager). Checks the table's structure and that our greedy tokens equal HF's in it; never a
timing (no timing asserts: these machines are shared, their timings vary)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    r = subprocess.run([sys.executable, str(ROOT / "bench/bench_pipeline.py"), "--smoke", "--work", str(tmp_path),
                        "--checkpoint", str(qwen3_vl_ckpt), "--json", str(tmp_path / "out.json")],
                       capture_output=True, text=True, timeout=600)  # a bound against hangs, not a speed check
    assert r.returncode == 0, r.stderr[-3000:]
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
    weights = json.loads((tmp_path / "art-tiny-int4" / "manifest.json").read_text())["graphs"]["decoder"]["weights"]
    assert (weights["attention"], weights["mlp"], weights["lm_head"], weights["int4_block"]) == ("int4",) * 3 + (128,)


# ---- issue 16: what a GPU visit needs before any CUDA call ------------------------------------------------------
sys.path.insert(0, str(ROOT / "bench"))
import pipeline_prepare as pp  # noqa: E402

GIB = 2**30


@pytest.mark.parametrize("free_gib,kept", [(60, ["2B", "8B"]), (40, ["2B"]), (9, []), (11, ["2B"])])
def test_disk_check_keeps_configs_in_order_of_priority(tmp_path, free_gib, kept):
    """2B needs 8.6 GiB, 8B 35 GB (checkpoint + bf16 graphs, docs/benchmarks.md), plus 2 GiB headroom."""
    got, dropped = pp.fit_to_disk(["2B", "8B"], tmp_path, free_gib * GIB)
    assert got == kept and [d.split(":")[0] for d in dropped] == [c for c in ("2B", "8B") if c not in kept]
    assert all("GiB of disk" in d for d in dropped)


def test_disk_check_counts_nothing_for_a_prepared_config(tmp_path):
    (tmp_path / "art-8B").mkdir()
    (tmp_path / "art-8B" / "manifest.json").write_text("{}")
    assert pp.fit_to_disk(["2B", "8B"], tmp_path, 11 * GIB) == (["2B", "8B"], [])


def test_one_config_failing_to_prepare_leaves_the_others(tmp_path, monkeypatch):
    """A config that fails (here: unknown to make_random_checkpoint.py, a real subprocess failure) is reported with
    the end of its log; the one that prepared is returned."""
    real = pp.prepare_gpu
    monkeypatch.setattr(pp, "prepare_gpu", lambda cfg, *a: ("ckpt", "art") if cfg == "2B" else real(cfg, *a))
    done, errors = pp.prepare_all(["2B", "nope"], tmp_path, None)
    assert done == {"2B": ("ckpt", "art")} and list(errors) == ["nope"]
    assert errors["nope"].startswith("failed (") and f"end of {tmp_path}/prepare-nope.log: " in errors["nope"]


def test_gpu_mode_without_a_gpu_stops_at_the_preflight(tmp_path):
    """No usable CUDA: one line, exit 3, nothing prepared (the disk check runs first and prints what it drops)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench/bench_pipeline.py"), "--configs", "2B", "--work",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no CUDA device visible to torch") and "has no CUDA provider" in last
    assert not (tmp_path / "ckpt-2B").exists()


def test_sigint_prints_the_table_even_when_the_parent_ignores_it(qwen3_vl_ckpt, tmp_path):
    """`timeout --signal=INT` (bench/gpu_visit.sh) mid-measurement: the table and footer are printed, exit 130.
    The child starts with SIGINT ignored, as a background job's children do; the bench restores the handler."""
    import signal

    p = subprocess.Popen([sys.executable, str(ROOT / "bench/bench_pipeline.py"), "--smoke", "--work", str(tmp_path),
                          "--checkpoint", str(qwen3_vl_ckpt), "--json", str(tmp_path / "out.json")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    for line in p.stderr:
        if line.startswith("prepared tiny in "):
            break
    time.sleep(1)  # inside the measurement of the only config
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out
    assert HEAD in out.splitlines() and "nothing measured; date: " in out
    assert out.rstrip().splitlines()[-1].startswith("interrupted at ")
    assert '"notes"' in (tmp_path / "out.json").read_text()
