"""The C++ runtime (runtime/cpp/, `qwen-vl-generate`) against independent references, on the CPU.

- End to end, `--backend worker` (the graphs on ONNX Runtime in a Python child, the whole loop in C++): greedy
  tokens == HF `model.generate` (EOS disabled) on request files saved from HF's own processor output: Qwen3-VL two
  images of different sizes, a Qwen3-VL video, a Qwen2.5-VL image (with its released repetition penalty 1.05),
  a text-only prompt; a ragged batch of two prompts written by `qwen-vl-request` == HF run on each prompt alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

import hf_processor as H

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / "build" / "runtime_cpp" / "qwen-vl-generate"
N_NEW = 20
VIDEO_FPS = 24.0


@pytest.fixture(scope="module")
def binary():
    r = subprocess.run(["bash", str(ROOT / "runtime" / "cpp" / "build.sh")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return BINARY


def export(ckpt, out):
    from qwen_vl_trt.export.artifacts import export_artifacts
    from qwen_vl_trt.export.build_engines import Limits

    export_artifacts(ckpt, out, "fp32", Limits(max_batch=2, max_seq=1024, max_cache_len=1024))
    return out


@pytest.fixture(scope="module")
def qwen3_artifacts(qwen3_vl_ckpt, tmp_path_factory):
    return export(qwen3_vl_ckpt, tmp_path_factory.mktemp("cpp_qwen3_artifacts"))


@pytest.fixture(scope="module")
def qwen2_5_artifacts(qwen2_5_vl_ckpt, tmp_path_factory):
    return export(qwen2_5_vl_ckpt, tmp_path_factory.mktemp("cpp_qwen2_5_artifacts"))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("cpp_media")
    rng = np.random.default_rng(7)
    paths = []
    for i, (h, w) in enumerate([(240, 320), (90, 300)]):
        paths.append(d / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return {"images": paths, "frames": rng.integers(0, 256, (30, 64, 96, 3), dtype=np.uint8),
            "frames_2_5": rng.integers(0, 256, (12, 112, 140, 3), dtype=np.uint8)}


def hf_inputs(processor, prompt, images=(), frames=None):
    """HF's processor output for one user turn (torch tensors)."""
    from transformers.video_utils import VideoMetadata

    content = [{"type": "image"} for _ in images] + ([{"type": "video"}] if frames is not None else [])
    messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {"images": [Image.open(p).convert("RGB") for p in images]} if images else {}
    if frames is not None:
        kwargs.update(videos=[frames], video_metadata=[VideoMetadata(total_num_frames=len(frames), fps=VIDEO_FPS)],
                      cap_pixels_per_frame=False)
    return processor(text=[text], return_tensors="pt", **kwargs)


def save_request(inputs, path) -> Path:
    """The HF processor's output as a request file, tensor for tensor."""
    tensors = {}
    for k, v in inputs.items():
        arr = np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v)
        tensors[k] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.astype(np.int64)
    save_file(tensors, str(path))
    return Path(path)


def hf_generate(hf, inputs) -> list[int]:
    """HF greedy tokens, EOS disabled (the model's generation_config supplies the rest, e.g. repetition penalty)."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=151643)
    saved, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None
    try:
        with torch.no_grad():
            out = hf.generate(**inputs, generation_config=gen)
    finally:
        hf.generation_config.eos_token_id = saved
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def generate(binary, artifacts, request, *flags, check=True):
    r = subprocess.run([str(binary), "--model-dir", str(artifacts), "--request", str(request), "--python", sys.executable,
                        "--temperature", "0", "--ignore-eos", "--max-new-tokens", str(N_NEW), *flags],
                       capture_output=True, text=True, timeout=300)
    if not check:
        return r
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---- end to end: C++ worker backend vs HF generate ---------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_processor(qwen3_vl_ckpt):
    return H.qwen3_processor(qwen3_vl_ckpt)


def test_qwen3_two_images_match_hf(binary, qwen3_artifacts, hf_qwen3_vl, qwen3_processor, media, tmp_path):
    inputs = hf_inputs(qwen3_processor, "Compare them.", media["images"])
    assert inputs["image_grid_thw"][0].tolist() != inputs["image_grid_thw"][1].tolist()
    ours = generate(binary, qwen3_artifacts, save_request(inputs, tmp_path / "req.safetensors"))
    assert ours["backend"] == "worker" and ours["timings"]["vision_calls"] == 1
    assert ours["sequences"][0]["token_ids"] == hf_generate(hf_qwen3_vl, inputs)
    assert len(ours["timings"]["decode_step_ms"]) == N_NEW - 1


def test_qwen3_video_matches_hf(binary, qwen3_artifacts, hf_qwen3_vl, qwen3_processor, media, tmp_path):
    inputs = hf_inputs(qwen3_processor, "What happens?", frames=media["frames"])
    ours = generate(binary, qwen3_artifacts, save_request(inputs, tmp_path / "req.safetensors"))
    assert ours["sequences"][0]["token_ids"] == hf_generate(hf_qwen3_vl, inputs)


def test_qwen3_text_only_matches_hf(binary, qwen3_artifacts, hf_qwen3_vl, qwen3_processor, tmp_path):
    inputs = hf_inputs(qwen3_processor, "Write a haiku about GPUs.")
    ours = generate(binary, qwen3_artifacts, save_request(inputs, tmp_path / "req.safetensors"), "--ort-graphs", "plugin")
    assert ours["sequences"][0]["token_ids"] == hf_generate(hf_qwen3_vl, inputs)


def test_ragged_batch_from_qwen_vl_request_matches_hf_alone(binary, qwen3_artifacts, hf_qwen3_vl, qwen3_processor, media,
                                                             tmp_path):
    from qwen_vl_trt.runtime import request_file

    prompts = ["Describe this image.", "What colours do you see in the top left corner? Answer in one sentence."]
    req = tmp_path / "batch.safetensors"
    args = ["--model-dir", str(qwen3_artifacts), "--image", str(media["images"][1]), "--out", str(req)]
    assert request_file.main(args + [a for p in prompts for a in ("--prompt", p)]) == 0
    mask = load_file(str(req))["attention_mask"]
    assert mask.shape[0] == 2 and mask[0].sum() < mask[1].sum()  # right-padded, ragged
    r = generate(binary, qwen3_artifacts, req, "--out", str(tmp_path / "out.json"), check=False)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    ours = json.loads((tmp_path / "out.json").read_text())
    for prompt, seq in zip(prompts, ours["sequences"]):
        assert seq["token_ids"] == hf_generate(hf_qwen3_vl, hf_inputs(qwen3_processor, prompt, [media["images"][1]]))
    # detokenize: the tokenizer's own decode of those ids
    from qwen_vl_trt.runtime.prompt import Tokenizer

    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.request_file", "--model-dir", str(qwen3_artifacts),
                        "--detokenize", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    texts = [json.loads(line)["text"] for line in r.stdout.splitlines()]
    assert texts == [Tokenizer(qwen3_artifacts).decode(s["token_ids"]) for s in ours["sequences"]]


def test_qwen2_5_image_matches_hf(binary, qwen2_5_artifacts, hf_qwen2_5_vl, qwen2_5_vl_ckpt, media, tmp_path):
    processor = H.qwen2_5_processor(qwen2_5_vl_ckpt, do_sample_frames=True, fps=2.0)
    inputs = hf_inputs(processor, "Describe this image.", [media["images"][0]])
    assert json.loads((qwen2_5_artifacts / "generation_config.json").read_text())["repetition_penalty"] == 1.05
    ours = generate(binary, qwen2_5_artifacts, save_request(inputs, tmp_path / "req.safetensors"))
    assert ours["sequences"][0]["token_ids"] == hf_generate(hf_qwen2_5_vl, inputs)
