"""The GPU visit's scripts on this CPU machine (issue 16): syntax, the budget / timeout / SIGINT handling of
bench/gpu_lib.sh, and bench/gpu_visit.sh --rehearse end to end up to the CUDA calls (the GPU steps themselves run
only on the device: docs/benchmarks.md "GPU visit")."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "bench").glob("gpu_*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_script_line_is_code_or_comment():
    """Finding 1 of issue 16: a comment line without '#' in gpu_stage.sh ran as a command. In the header comment
    block of each script (up to `set -`), every line is a comment."""
    for script in SCRIPTS:
        lines = script.read_text().splitlines()
        header = lines[1:next(i for i, ln in enumerate(lines) if ln.startswith("set -"))] if script.name != \
            "gpu_lib.sh" else lines[:next(i for i, ln in enumerate(lines) if not ln.startswith("#"))]
        assert all(ln.startswith("#") for ln in header), script.name


STEPS = """
set -uo pipefail
. {lib}
gpu_init 8
gpu_note "a note"
gpu_step quick 1 60 true
gpu_step fails 1 60 bash -c 'echo boom; exit 5'
OK_RCS="0 3" gpu_step expected 1 60 bash -c 'exit 3'
gpu_step slow 1 60 {py} -c "
import signal, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as bench_pipeline.py does
try:
    time.sleep(60)
except KeyboardInterrupt:
    print('the final table, printed on SIGINT')
    raise SystemExit(130)"
gpu_step late 30 60 true
gpu_finish
"""


def test_budget_steps_logs_and_exit_status(tmp_path):
    """Each step's full log under $OUT, a row per step as it ends, a step that outlives the budget gets SIGINT
    (its handler's output is in its log), a step that does not fit is skipped; a failed step makes the exit 1."""
    script = tmp_path / "visit.sh"
    script.write_text(STEPS.format(lib=ROOT / "bench/gpu_lib.sh", py=sys.executable))
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OUT": str(out), "GPU_RESERVE_S": "0"})
    assert r.returncode == 1, r.stdout + r.stderr
    rows = [ln for ln in (out / "summary.md").read_text().splitlines() if ln.startswith("| ")]
    assert rows[0] == "| step | status | s | log |"
    status = {row.split(" | ")[0][2:]: row.split(" | ")[1] for row in rows[1:]}
    assert status["quick"] == "done" and status["fails"] == "FAILED (exit 5)"
    assert status["expected"] == "done (exit 3, expected here)"
    assert re.fullmatch(r"cut by the budget \(SIGINT after \d s\)", status["slow"])
    assert re.fullmatch(r"skipped \(-?\d+ s left, needs 30\)", status["late"])
    assert (out / "slow.log").read_text() == "the final table, printed on SIGINT\n"
    assert (out / "fails.log").read_text() == "boom\n"
    summary = (out / "summary.md").read_text()
    assert "a note" in summary and "fails (fails.log):\n    boom" in summary and "exit 1 (0 all done" in summary


@pytest.mark.parametrize("args", [[], ["abc"], ["100", "--fast"], ["100", "--rehearse", "x"]])
def test_visit_usage_errors(args):
    r = subprocess.run(["bash", str(ROOT / "bench/gpu_visit.sh"), *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 64 and r.stderr.strip().splitlines()[-1].startswith(("usage: ", "error: budget")), r.stderr


def test_visit_rehearsal_up_to_the_cuda_calls(tmp_path):
    """Every step's non-CUDA path: staging (when .gpu/ is staged), the preflight line, the GPU tests collected
    with the visit's selections, bench_pipeline.py's disk check and CUDA preflight ending in one line (exit 3)."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "VISIT_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    (tmp_path / "work").mkdir()
    sys.path.insert(0, str(ROOT / "bench"))
    import pipeline_prepare as pp

    fits_8b = bool(pp.fit_to_disk(["8B"], tmp_path / "work", pp.free_bytes(tmp_path / "work"))[0])
    r = subprocess.run(["bash", str(ROOT / "bench/gpu_visit.sh"), "300", "--rehearse"], capture_output=True,
                       text=True, timeout=280, env=env, cwd=tmp_path)
    assert r.returncode == (0 if fits_8b else 2), r.stdout[-3000:] + r.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    status = {ln.split(" | ")[0][2:]: ln.split(" | ")[1] for ln in summary.splitlines() if ln.startswith("| ")}
    assert status["stage"] == "done" and status["ort_cuda"] == "done" and status["plugins"] == "done"
    assert status["prepare"] == "not run (VISIT_PREPARE=0; the default in a rehearsal)"
    assert status["bench_2B"] == "done (exit 3, expected here)"
    assert status["bench_8B"] == ("done (exit 3, expected here)" if fits_8b else "skipped (exit 4: its log says why)")
    assert "preflight: onnxruntime " in summary and "has no CUDA provider" in summary
    # tp (bench/tp_visit.py): the world-size-1 rank graph exported with its DistCollective nodes, equal to
    # decoder.onnx on ONNX Runtime, built ahead of time by TensorRT-RTX, stopped at trt_tp's GPU count
    assert status["tp"] == "done (exit 3, expected here)"
    assert re.search(r"tp1: stopped at the CUDA calls: a --tp 1 export needs 1 GPUs, 0 visible", summary), summary
    tp_log = (tmp_path / "work" / "tp.log").read_text()
    assert "the world-size-1 rank graph equals decoder.onnx exactly" in tp_log
    assert "decoder.rank0.onnx: 9 DIST_COLLECTIVE layers parsed" in tp_log and "Traceback" not in tp_log
    assert re.search(r"^1 test collected", (out / "ort_cuda.log").read_text(), re.M)
    collected = re.search(r"^(\d+)/(\d+) tests collected \((\d+) deselected\)", (out / "plugins.log").read_text(), re.M)
    assert collected and int(collected[1]) > 0 and int(collected[3]) > 0  # the 16k-token cases are left out
    for cfg in ("2B", "8B") if fits_8b else ("2B",):
        log = (out / f"bench_{cfg}.log").read_text()
        assert "Traceback" not in log and log.strip().splitlines()[-1].startswith("error: no CUDA device visible")
    if not fits_8b:  # this machine's disk: the 8B config is dropped before anything is prepared
        log = (out / "bench_8B.log").read_text().strip().splitlines()
        assert log[0].startswith("dropped 8B: needs 32.6 GiB of disk") and log[-1].startswith("error: no config fits")
    assert len(list(out.iterdir())) <= 8  # the device tool returns at most 8 files


def test_visit_real_mode_runs_through_without_a_gpu(tmp_path):
    """The real (non-rehearsal) path's shell on this machine, `python3` being the venv's: no unbound variable or
    missing command; unstaged pieces are one FAILED step (exit 3, the message in the summary) and the steps that
    no longer fit the small budget are skipped, not started."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "VISIT_WORK": str(tmp_path / "work"), "VISIT_PREPARE": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / "bench/gpu_visit.sh"), "50"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert "unbound variable" not in r.stdout + r.stderr and "command not found" not in r.stdout + r.stderr
    summary = (out / "summary.md").read_text()
    status = {ln.split(" | ")[0][2:]: ln.split(" | ")[1] for ln in summary.splitlines() if ln.startswith("| ")}
    staged = (ROOT / ".gpu" / "ort0").is_dir()
    assert status["stage"] == ("done" if staged else "FAILED (exit 3)")
    assert r.returncode == (2 if staged else 1), summary
    if not staged:
        assert "onnxruntime-gpu pieces missing or damaged" in summary
    assert all(status[s].startswith("skipped (") for s in ("ort_cuda", "plugins", "bench_2B", "bench_8B", "tp")), summary
