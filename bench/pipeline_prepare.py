"""Preparation for bench/bench_pipeline.py: random-weight checkpoints with the released configs and their bf16
export (GPU mode), or the tiny demo checkpoint (--smoke); which configs the disk can hold; what failed.

GPU mode per config: bench/make_random_checkpoint.py CONFIG (bf16 shards), the tokenizer files copied in, then
`export_all.sh --no-engines --max-batch 8` (graphs + manifest). One config failing does not stop the others:
`prepare_all` returns what prepared and, per failed config, one line with the end of its log.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
INT4_BLOCK = 128  # --weights int4: the block these GPU exports ask for (also export_all.sh's default:
# model/weight_formats.py DEFAULT_INT4_BLOCK; named here so that a change of that default leaves these exports be)
# disk a config's checkpoint + bf16 graphs take (measured here: 2B 4.26 + 4.88 GB, 8B 17.53 + 17.54 GB,
# docs/benchmarks.md "Export: time and peak RSS"); HEADROOM keeps the filesystem usable for logs and images
NEED_BYTES = {"2B": int(8.6 * 2**30), "8B": int(35e9)}
HEADROOM = 2 * 2**30


def artifacts_dir(work: Path, config: str, weights: str = "dense") -> Path:
    return work / (f"art-{config}" if weights == "dense" else f"art-{config}-{weights}")


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def fit_to_disk(configs, work: Path, free: int, weights: str = "dense") -> tuple[list, list]:
    """`configs` in order of priority -> (those that fit in `free` bytes together, one line per dropped one).
    An already prepared config needs nothing; an unknown one is kept (its size is not known here)."""
    kept, dropped, used = [], [], HEADROOM
    for cfg in configs:
        ready = (artifacts_dir(work, cfg, weights) / "manifest.json").is_file()
        need = 0 if ready else NEED_BYTES.get(cfg, 0)
        if used + need <= free:
            kept.append(cfg)
            used += need
        else:
            dropped.append(f"{cfg}: needs {need / 2**30:.1f} GiB of disk, {max(free - used, 0) / 2**30:.1f} GiB "
                           f"left on {work} (after {HEADROOM / 2**30:.0f} GiB headroom and the configs before it)")
    return kept, dropped


def _run(cmd, log: Path, env=None) -> None:
    with open(log, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        tail = " / ".join(line.strip() for line in log.read_text(errors="replace").splitlines()[-3:])
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(map(str, cmd))}; end of {log}: {tail}")


def add_tokenizer(ckpt: Path, tokenizer_dir: Path | None) -> None:
    """tokenizer.json, tokenizer_config.json (its chat template dropped) and our chat_template.jinja."""
    if (ckpt / "tokenizer.json").is_file():
        return
    if tokenizer_dir is None:
        raise RuntimeError(f"{ckpt} has no tokenizer.json: pass --tokenizer-dir (tokenizer.json, tokenizer_config.json)")
    (ckpt / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (ckpt / "chat_template.jinja").write_text((ROOT / "export/assets/qwen3_vl_chat_template.jinja").read_text())


def prepare_gpu(config: str, work: Path, tokenizer_dir: Path | None, weights: str = "dense") -> tuple[Path, Path]:
    suffix = "" if weights == "dense" else f"-{weights}"
    ckpt, art, log = work / f"ckpt-{config}", artifacts_dir(work, config, weights), work / f"prepare-{config}{suffix}.log"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHON": sys.executable}
    if not (ckpt / "model.safetensors.index.json").is_file():
        _run([sys.executable, HERE / "make_random_checkpoint.py", config, ckpt, "--dtype", "bf16"], log, env)
    add_tokenizer(ckpt, tokenizer_dir)
    if not (art / "manifest.json").is_file():
        _run(["bash", ROOT / "export_all.sh", ckpt, art, "--dtype", "bf16", "--no-engines", "--max-batch", "8",
              "--max-seq", "2048", "--max-cache-len", "4096", "--weights", weights,
              *(["--int4-block-size", str(INT4_BLOCK)] if weights == "int4" else [])], log, env)
    return ckpt, art


def prepare_smoke(work: Path, checkpoint: Path | None, weights: str = "dense") -> tuple[Path, Path]:
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits
    from qwen_vl_trt.export.demo_checkpoint import make_checkpoint
    from qwen_vl_trt.model.weight_formats import WeightFormats

    ckpt = checkpoint or make_checkpoint(work / "ckpt-tiny", "qwen3_vl", seed=0)
    art = work / ("art-tiny" if weights == "dense" else f"art-tiny-{weights}")
    if not (art / "manifest.json").is_file():
        export_all(ckpt, art, "fp32", Limits(max_batch=2, max_seq=1024, max_cache_len=2048),
                   formats=WeightFormats.parse(weights, int4_block=INT4_BLOCK))
    return Path(ckpt), art


def prepare_all(configs, work: Path, tokenizer_dir, weights: str = "dense") -> tuple[dict, dict]:
    """Checkpoints and exports of all configs at once (one thread each; the work is in subprocesses) ->
    ({config: (checkpoint, artifacts)} in the order given, {config: why it failed})."""
    done, errors = {}, {}

    def one(cfg):
        try:
            done[cfg] = prepare_gpu(cfg, work, tokenizer_dir, weights)
        except Exception as e:  # noqa: BLE001 -- reported per config; the others go on
            errors[cfg] = str(e)
    threads = [threading.Thread(target=one, args=(c,), daemon=True) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {c: done[c] for c in configs if c in done}, errors
