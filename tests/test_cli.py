"""`trt-run` on bad input: exactly one line `error: ...` on stderr, exit code 2, no traceback.

Each case runs the real command in a subprocess. `--backend tensorrt` without TensorRT is simulated by
blocking the `tensorrt` and `tensorrt_rtx` imports in that subprocess.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import media_bombs
from media_bombs import BOMB_MESSAGE, png_bomb
from qwen_vl_trt.export.export_all import export_all
from qwen_vl_trt.model.contracts import Limits

MAX_SEQ = 128
LONG_PROMPT = "Tell me everything about this. " * 40


@pytest.fixture(scope="module")
def artifacts(qwen3_vl_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_artifacts")
    export_all(qwen3_vl_ckpt, out, "fp32",
                     Limits(max_patches=1024, max_frames=8, max_batch=2, max_seq=MAX_SEQ, max_cache_len=256))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_inputs")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "ok.png")
    (d / "empty.png").write_bytes(b"")
    (d / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (d / "notes.txt").write_text("hello")
    good = (d / "ok.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(np.zeros((2, 500, 3), np.uint8)).save(d / "thin.png")
    Image.fromarray(np.zeros((1024, 1024, 3), np.uint8)).save(d / "big.png")
    (d / "bomb.png").write_bytes(png_bomb(9000, 9000))  # 236 KB; 243 MB decoded
    return d


def trt_run(*args, block_tensorrt: bool = False) -> tuple[int, str]:
    code = "import sys\n"
    if block_tensorrt:
        code += "sys.modules['tensorrt'] = None; sys.modules['tensorrt_rtx'] = None\n"
    code += "from qwen_vl_trt.runtime.serve.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stderr


def assert_error(args, message, **kw):
    rc, err = trt_run(*args, **kw)
    assert rc == 2
    assert err.splitlines() == [f"error: {message}"]


@pytest.mark.parametrize("name,message", [
    ("missing.png", "image not found: {p}; check the path"),
    ("empty.png", "image file is empty: {p}; pass a valid PNG, JPEG or WebP image"),
    ("garbage.png", "cannot read image {p}: not a supported image format; convert it to PNG or JPEG"),
    ("notes.txt", "cannot read image {p}: not a supported image format; convert it to PNG or JPEG"),
    ("thin.png", "image 500x2 has aspect ratio 250.0 > 200; crop or pad it to at most 200:1"),
    ("big.png", "{p} needs 4096 vision patches, artifacts allow at most 1024 per vision call: re-export with a "
                "larger --max-patches or pass a smaller image"),
    ("bomb.png", BOMB_MESSAGE.replace("{name}", "{p}")),  # refused from its header (issue 14)
])
def test_bad_image(artifacts, files, name, message):
    p = files / name
    assert_error(["--model-dir", artifacts, "--image", p], message.format(p=p))


def test_truncated_image(artifacts, files):
    p = files / "truncated.png"
    rc, err = trt_run("--model-dir", artifacts, "--image", p)
    assert rc == 2 and len(err.splitlines()) == 1
    assert re.fullmatch(rf"error: cannot read image {re.escape(str(p))}: file is corrupt or truncated \(.+\); "
                        r"re-export it as PNG or JPEG\n", err)


def test_missing_video(artifacts, tmp_path):
    assert_error(["--model-dir", artifacts, "--video", tmp_path / "clip"], f"video not found: {tmp_path / 'clip'}; "
                                                                          "check the path")


def test_prompt_too_long(artifacts):
    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.prompt import build_messages, build_prompt

    pre = Preprocessor(load_manifest(artifacts))
    n = len(build_prompt(pre.tokenizer, build_messages(LONG_PROMPT)).input_ids)
    assert n > MAX_SEQ
    assert_error(["--model-dir", artifacts, "--prompt", LONG_PROMPT],
                 f"prompt has {n} tokens, artifacts allow at most {MAX_SEQ}: re-export with a larger --max-seq")
    assert pre.prepare(Request("short")).num_tokens <= MAX_SEQ


def test_prompt_plus_new_tokens_exceed_cache(artifacts):
    assert_error(["--model-dir", artifacts, "--prompt", "hi", "--max-new-tokens", "300"],
                 "prompt has 9 tokens and --max-new-tokens is 300: together they exceed the 256-token cache of the "
                 "artifacts; lower --max-new-tokens or re-export with a larger --max-cache-len")


def test_more_prompts_than_the_artifacts_batch_run_in_flight(artifacts):
    """Was an error (a batch over the artifacts' max batch 2); with in-flight batching (issue 13) the third prompt
    takes the first slot that frees. Each prompt's tokens == that prompt run alone (`generate` alone == HF:
    tests/test_generate.py)."""
    import json

    def tokens(*prompts):
        args = [a for p in prompts for a in ("--prompt", p)]
        r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.serve.cli", "--model-dir", str(artifacts), "--json",
                            "--temperature", "0", "--ignore-eos", "--max-new-tokens", "6", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["token_ids"]

    prompts = ("a", "Write a haiku about GPUs.", "c")
    assert tokens(*prompts) == [tokens(p) for p in prompts]


def test_missing_artifacts(tmp_path):
    assert_error(["--model-dir", tmp_path / "none", "--prompt", "hi"],
                 f"artifacts directory not found: {tmp_path / 'none'}; run export_all.sh CHECKPOINT "
                 f"{tmp_path / 'none'} first")


def test_mismatched_artifacts(artifacts, tmp_path):
    import json
    import shutil

    d = tmp_path / "a"
    d.mkdir()
    for f in Path(artifacts).iterdir():
        if f.is_dir():  # .ort-cache: ONNX Runtime's default cache (runtime/backends/ort_cache.py), not an artifact
            continue
        (d / f.name).symlink_to(f) if f.suffix in (".onnx", ".data") else shutil.copyfile(f, d / f.name)
    raw = json.loads((d / "manifest.json").read_text())
    raw["model_spec"]["vision"]["depth"] = 27
    (d / "manifest.json").write_text(json.dumps(raw))
    assert_error(["--model-dir", d, "--prompt", "hi"], f"{d}/manifest.json describes another model than "
                 f"{d}/config.json ('qwen3_vl'); re-run export_all.sh for this checkpoint")


def test_backend_tensorrt_without_tensorrt(artifacts):
    assert_error(["--model-dir", artifacts, "--prompt", "hi", "--backend", "tensorrt"],
                 "--backend tensorrt: no TensorRT module (tensorrt or tensorrt_rtx) is installed; use --backend "
                 "onnxruntime", block_tensorrt=True)


def test_backend_tensorrt_without_engines_or_gpu(artifacts):
    """Here a TensorRT module may be importable, but no GPU/cuda-python or no engines: still one clear line."""
    rc, err = trt_run("--model-dir", artifacts, "--prompt", "hi", "--backend", "tensorrt")
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --backend tensorrt: ") and "--backend onnxruntime" in err


@pytest.mark.parametrize("args,message", [
    ([], "nothing to do: pass --prompt TEXT, --image PATH or --video PATH"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature -1.0: must be >= 0 (0 = greedy)"),
    (["--prompt", "x", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty 0.0: must be in [0.01, 100] (1 = off)"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
])
def test_bad_options(artifacts, args, message):
    assert_error(["--model-dir", artifacts, *args], message)


def test_auto_backend_runs_and_exits_0(artifacts, files):
    rc, err = trt_run("--model-dir", artifacts, "--image", files / "ok.png", "--max-new-tokens", "3")
    assert rc == 0 and "onnxruntime: prompt" in err


def test_bf16_artifacts_on_the_cpu_provider(qwen3_vl_ckpt, tmp_path, files):
    """ONNX Runtime's CPU provider has no bf16 MatMul/Add: say what runs bf16 graphs instead of a stack trace."""
    out = tmp_path / "bf16"
    export_all(qwen3_vl_ckpt, out, "bf16", Limits(max_patches=1024, max_batch=1, max_seq=MAX_SEQ,
                                                        max_cache_len=256))
    rc, err = trt_run("--model-dir", out, "--image", files / "ok.png", "--backend", "onnxruntime")
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {out}/vision.ort.onnx: ONNX Runtime's CPU provider has no kernel for an op")
    assert err.rstrip().endswith("bf16/fp16 graphs need onnxruntime-gpu or TensorRT engines, or re-export with "
                                 "--dtype fp32 for the CPU")


def test_timing_line_names_the_provider(artifacts, files):
    """Issue 16: trt-run says where ONNX Runtime runs (here the CPU build: the CPU provider, no CUDA graph)."""
    rc, err = trt_run("--model-dir", artifacts, "--image", files / "ok.png", "--max-new-tokens", "2",
                      "--backend", "onnxruntime")
    assert rc == 0 and err.splitlines()[-1].endswith(" tok/s | CPUExecutionProvider, CUDA graph off"), err


@pytest.mark.parametrize("backend", ["onnxruntime", "auto"])
def test_device_cuda_refuses_the_cpu(artifacts, files, backend):
    """`--device cuda` where ONNX Runtime's CUDA provider cannot run: one line, exit 2, never a CPU run. With
    --backend onnxruntime the preflight stops it before the graphs load; with auto, the loaded sessions say so."""
    import onnxruntime as ort

    rc, err = trt_run("--model-dir", artifacts, "--image", files / "ok.png", "--max-new-tokens", "2",
                      "--backend", backend, "--device", "cuda")
    assert rc == 2 and len(err.splitlines()) == 1, err
    if backend == "onnxruntime":
        assert err.startswith(f"error: --device cuda: onnxruntime {ort.__version__} (")
        assert err.rstrip().endswith("has no CUDA provider (the CPU build; install onnxruntime-gpu); not running on "
                                     "the CPU instead")
    else:
        assert err.rstrip() == ("error: --device cuda: ONNX Runtime runs the vision, embed, decoder graph(s) on "
                                "CPUExecutionProvider, not the CUDA provider (install onnxruntime-gpu with CUDA 13 / "
                                "cuDNN 9 libraries)")


# ---- parser floods (issue 21 item 2) ----------------------------------------------------------------------
@pytest.mark.parametrize("name,make,message", [
    ("app1.jpg", lambda: media_bombs.jpeg_app1_flood(3_000_000),
     "image {p} is a JPEG with more than 1000 marker segments before its image data (encoders write under 30); "
     "re-encode it"),
    ("scans.jpg", lambda: media_bombs.jpeg_scan_flood(60_000),
     "image {p} is a JPEG with more than 256 scans (encoders write about 10); re-encode it"),
    ("chunks.png", lambda: media_bombs.png_chunk_flood(1_000_000),
     "image {p} is a PNG with more than 3186 chunks (at most 256 + one per 4096 bytes of file); re-encode it"),
    ("comments.gif", lambda: media_bombs.gif_comment_flood(3_000_000),
     "image {p} did not decode within its limit (0.5 s of CPU time, 1.0 s in all, for reading its header); "
     "re-encode it as a plain PNG or JPEG"),
])
def test_parser_floods_are_one_error_line(artifacts, tmp_path, name, make, message):
    """A file on disk goes through the same guard as a server request (runtime/media_guard.py): one line, exit 2,
    where PIL in-process took 6-40 s (issue 21)."""
    p = tmp_path / name
    p.write_bytes(make())
    assert_error(["--model-dir", artifacts, "--image", p], message.format(p=p))
