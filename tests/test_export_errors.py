"""Export of a broken checkpoint ends with one clear line on stderr and exit code 2 (no traceback)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys


def _export(ckpt, out):
    return subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.cli", str(ckpt), str(out), "--dtype", "fp32"],
                          capture_output=True, text=True, timeout=300)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_model_type(qwen3_vl_ckpt, tmp_path):
    ckpt = _copy(qwen3_vl_ckpt, tmp_path / "ck")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "mllama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = _export(ckpt, tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {ckpt / 'config.json'}: model_type 'mllama' is not supported (supported: qwen2_5_vl, qwen3_vl, qwen3_vl_moe)"]


def test_truncated_safetensors(qwen3_vl_ckpt, tmp_path):
    ckpt = _copy(qwen3_vl_ckpt, tmp_path / "ck")
    st = ckpt / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    r = _export(ckpt, tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {st}: truncated ({len(data) // 2} bytes, header needs {len(data)}); download it again"]


def test_missing_shard(tmp_path):
    from qwen_vl_trt.export.demo_checkpoint import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "sharded", "qwen3_vl", max_shard_size="20MB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (ckpt / victim).unlink()
    r = _export(ckpt, tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {ckpt}: shard(s) listed in model.safetensors.index.json are missing: {victim}"]


def test_empty_checkpoint_argument_means_the_demo(tmp_path):
    """`export_all.sh "" OUT` (the form README/docs use to name OUT without a checkpoint) makes the demo
    checkpoint in OUT and exports it fp32, as no argument does; it is not read as the current directory."""
    from qwen_vl_trt.export.export_all import export_all

    lines = []
    manifest = export_all("", tmp_path / "out", log=lines.append)
    assert lines[0].startswith(f"[1/5] no checkpoint given: making the tiny random-weight Qwen3-VL demo checkpoint in "
                               f"{tmp_path / 'out' / 'demo_checkpoint'} (dtype fp32")
    assert json.loads(manifest.read_text())["dtype"] == "float32"
    assert (tmp_path / "out" / "demo_checkpoint" / "config.json").is_file()


def test_export_all_sh_with_a_python_that_lacks_the_package_is_one_line(tmp_path):
    """PYTHON set to an interpreter without qwen_vl_trt (a fresh shell without the venv): one line, exit 2."""
    from pathlib import Path

    bare = shutil.which("python3", path="/usr/bin:/bin")
    probe = subprocess.run([bare, "-c", "import qwen_vl_trt"], capture_output=True)
    assert probe.returncode != 0, "the system python3 imports qwen_vl_trt: this test needs one that does not"
    script = Path(__file__).resolve().parents[1] / "export_all.sh"
    r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": bare})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: {bare} cannot import qwen_vl_trt: run 'bash scripts/setup.sh' "
                                     "(makes .venv/) or set PYTHON"]
