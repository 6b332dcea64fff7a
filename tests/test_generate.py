"""End to end: export_all.sh (fp32, ONNX Runtime) then `trt-run` greedy tokens == HF `model.generate`.

HF side: `Qwen3VLForConditionalGeneration.generate(do_sample=False, max_new_tokens=32)` with EOS disabled
(`eos_token_id=None`, what `--ignore-eos` means), on inputs built by HF's own processor (PIL image
processor, tokenizer + chat template, Qwen3-VL video processor without torchvision: tests/hf_processor.py).
Our side: the same files through `trt-run --json --temperature 0 --ignore-eos --max-new-tokens 32`.
Cases: one image, two images, a video (frame directory), text only, a batch of two prompts of different
lengths (each compared with HF run alone), the OrtValue I/O-binding path, and the sampling warpers vs HF's.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hf_processor as H
from hf_reference import hf_greedy_new_tokens
from qwen_vl_trt.runtime.serve import cli
from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig, logits_to_probs

ROOT = Path(__file__).resolve().parents[1]
N_NEW = 32
VIDEO_FPS = 24.0  # trt-run's frame rate for a frame directory (HF's fallback for videos without metadata)
LONG_PROMPT = "What colours do you see in the top left corner of this picture? Answer in one short sentence."


@pytest.fixture(scope="module")
def artifacts(qwen3_vl_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "export_all.sh"), str(qwen3_vl_ckpt), str(out), "--dtype", "fp32",
                        "--no-engines", "--max-batch", "2", "--max-seq", "512", "--max-cache-len", "1024"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[5/5] writing" in r.stderr
    return out


def write_media(d: Path, image_sizes, frames_shape, seed: int) -> dict:
    """Random RGB images of `image_sizes` [(h, w)] and a directory of frames uint8 `frames_shape` (n, h, w, 3)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(image_sizes):
        paths.append(d / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    frames = rng.integers(0, 256, frames_shape, dtype=np.uint8)
    (d / "frames").mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(d / "frames" / f"{i:03d}.png")
    return {"images": paths, "frames_dir": d / "frames", "frames": frames}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return write_media(tmp_path_factory.mktemp("media"), [(240, 320), (90, 300)], (30, 64, 96, 3), seed=7)


@pytest.fixture(scope="module")
def processor(qwen3_vl_ckpt):
    return H.qwen3_processor(qwen3_vl_ckpt)


def hf_generate(hf, processor, prompt, images=(), frames=None, system=None) -> list[int]:
    """HF greedy generation of N_NEW tokens with EOS disabled, inputs from HF's processor."""
    from transformers.video_utils import VideoMetadata

    content = [{"type": "image"} for _ in images] + ([{"type": "video"}] if frames is not None else [])
    messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + \
        [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {"images": [Image.open(p).convert("RGB") for p in images]} if images else {}
    if frames is not None:
        kwargs.update(videos=[frames], video_metadata=[VideoMetadata(total_num_frames=len(frames), fps=VIDEO_FPS)],
                      cap_pixels_per_frame=False)
    inputs = processor(text=[text], return_tensors="pt", **kwargs)
    return hf_greedy_new_tokens(hf, inputs, N_NEW)


def run_json(artifacts, *args) -> dict:
    cfg = cli.RunConfig.from_args(cli.parser().parse_args(
        ["--model-dir", str(artifacts), "--json", "--temperature", "0", "--ignore-eos",
         "--max-new-tokens", str(N_NEW), "--backend", "onnxruntime", *args]))
    buf = io.StringIO()
    cli.run(cfg, out=buf, err=io.StringIO())
    return json.loads(buf.getvalue())


def run_cli_json(artifacts, *args) -> dict:
    """`python -m qwen_vl_trt.runtime.serve.cli` in a child process, as a user runs trt-run (greedy, EOS ignored)."""
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.serve.cli", "--model-dir", str(artifacts), "--json",
                        "--temperature", "0", "--ignore-eos", "--max-new-tokens", str(N_NEW), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_one_image_subprocess_matches_hf(artifacts, media, hf_qwen3_vl, processor):
    img = media["images"][0]
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.serve.cli", "--model-dir", str(artifacts),
                        "--image", str(img), "--json", "--temperature", "0", "--ignore-eos",
                        "--max-new-tokens", str(N_NEW)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    assert ours["token_ids"] == hf_generate(hf_qwen3_vl, processor, "Describe this image.", [img])
    assert len(ours["token_ids"]) == N_NEW
    assert ours["timings"]["backend"] == "onnxruntime" and ours["timings"]["decode_tokens"] == N_NEW - 1


@pytest.mark.parametrize("graphs", ["fused", "plugin"])
def test_two_images_with_system_match_hf(artifacts, media, hf_qwen3_vl, processor, graphs):
    """Both ONNX Runtime graph sets: *.ort.onnx (the default) and the TensorRT graphs' reference bodies."""
    imgs = media["images"]
    ours = run_json(artifacts, "--image", str(imgs[0]), "--image", str(imgs[1]), "--prompt", "Compare them.",
                    "--system", "You are terse.", "--ort-graphs", graphs)
    assert ours["token_ids"] == hf_generate(hf_qwen3_vl, processor, "Compare them.", imgs, system="You are terse.")


@pytest.mark.parametrize("graphs", ["fused", "plugin"])
def test_video_matches_hf(artifacts, media, hf_qwen3_vl, processor, graphs):
    ours = run_json(artifacts, "--video", str(media["frames_dir"]), "--prompt", "What happens?", "--ort-graphs", graphs)
    assert ours["token_ids"] == hf_generate(hf_qwen3_vl, processor, "What happens?", frames=media["frames"])


def test_text_only_matches_hf(artifacts, hf_qwen3_vl, processor):
    ours = run_json(artifacts, "--prompt", "Write a haiku about GPUs.")
    assert ours["token_ids"] == hf_generate(hf_qwen3_vl, processor, "Write a haiku about GPUs.")


def test_batch_of_different_lengths_matches_hf_run_alone(artifacts, media, hf_qwen3_vl, processor):
    img = media["images"][0]
    ours = run_json(artifacts, "--image", str(img), "--prompt", "Describe this image.", "--prompt", LONG_PROMPT)
    assert ours["prompt_tokens"][0] < ours["prompt_tokens"][1]
    assert isinstance(ours["timings"], list) and len(ours["timings"]) == 2
    for prompt, ids in zip(["Describe this image.", LONG_PROMPT], ours["token_ids"]):
        assert ids == hf_generate(hf_qwen3_vl, processor, prompt, [img])


def test_io_binding_path_gives_the_same_tokens(artifacts, media):
    """OrtValue I/O binding (the CUDA EP's device-resident cache path) on the CPU EP == plain numpy I/O."""
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request

    outs = []
    for binding in (False, True):
        model = load_model(artifacts, "onnxruntime", io_binding=binding)
        req = Preprocessor(model.manifest).prepare(Request("Describe this image.", (str(media["images"][1]),)))
        res = generate(model, [req, req], Sampler(SamplingConfig(temperature=0)), 8, ignore_eos=True)
        outs.append([r.token_ids for r in res])
    assert outs[0] == outs[1] and outs[0][0] == outs[0][1]
    assert model.sessions["decoder"].resident  # the binding run kept present_* on the EP's device


def test_streamed_text_equals_decoded_tokens(artifacts, media):
    cfg = cli.RunConfig.from_args(cli.parser().parse_args(
        ["--model-dir", str(artifacts), "--image", str(media["images"][0]), "--temperature", "0",
         "--ignore-eos", "--max-new-tokens", "12"]))
    out, err = io.StringIO(), io.StringIO()
    results = cli.run(cfg, out=out, err=err)
    from qwen_vl_trt.runtime.prompt import Tokenizer

    assert out.getvalue() == Tokenizer(artifacts).decode(results[0].token_ids) + "\n"
    assert "TTFT" in err.getvalue() and "decode" in err.getvalue()


def test_eos_stops_and_sampling_is_seeded(artifacts):
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request

    model = load_model(artifacts, "onnxruntime")
    req = Preprocessor(model.manifest).prepare(Request("Hello"))
    greedy = generate(model, [req], Sampler(SamplingConfig(temperature=0)), 6, ignore_eos=True)[0].token_ids
    # pretend the 3rd greedy token is an EOS id: generation stops right after it, EOS included (HF)
    stopped = generate(model, [req], Sampler(SamplingConfig(temperature=0)), 6, eos_token_ids=(greedy[2],))
    assert stopped[0].token_ids == greedy[:3]
    cfg = SamplingConfig(temperature=0.9, top_k=50, top_p=0.9, seed=3)
    a = generate(model, [req], Sampler(cfg), 8, ignore_eos=True)[0].token_ids
    b = generate(model, [req], Sampler(cfg), 8, ignore_eos=True)[0].token_ids
    assert a == b


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.8), (1.0, 0, 0.5), (1.3, 5, 1.0), (0.5, 0, 1.0)])
def test_sampling_probabilities_match_hf_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 1000)) * 3).astype(np.float32)
    logits[0, :10] = 5.0  # ties at the top-k boundary
    scores = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits))
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ref = torch.softmax(scores, dim=-1).numpy()
    ours = logits_to_probs(logits, SamplingConfig(temperature, top_k, top_p))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    assert np.array_equal(ours > 0, ref > 0)  # the same tokens survive


@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.8])
def test_repetition_penalty_matches_hf_processor(penalty):
    """Prompt + generated tokens (repeats included) penalized as HF's RepetitionPenaltyLogitsProcessor does."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from qwen_vl_trt.runtime.sampling import apply_repetition_penalty

    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((2, 500)) * 3).astype(np.float32)
    history = rng.integers(0, 500, (2, 40))
    history[0, :5] = history[0, 5]  # repeated ids
    seen = np.zeros(logits.shape, bool)
    np.put_along_axis(seen, history, True, axis=-1)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(history), torch.from_numpy(logits.copy()))
    np.testing.assert_array_equal(apply_repetition_penalty(logits, seen, penalty), ref.numpy())
    sampler = Sampler(SamplingConfig(temperature=0, repetition_penalty=penalty))
    sampler.start(list(history), 500)
    first = sampler.sample(logits)
    assert first.tolist() == ref.numpy().argmax(-1).tolist() and sampler.seen[[0, 1], first].all()


def test_sampling_defaults_from_generation_config():
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8}
    assert SamplingConfig.from_generation_config(gen) == SamplingConfig(0.7, 20, 0.8)
    assert SamplingConfig.from_generation_config(gen, temperature=0.0).greedy
    assert SamplingConfig.from_generation_config({"do_sample": False}).greedy
    qwen2_5 = {"do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1, "repetition_penalty": 1.05}
    assert SamplingConfig.from_generation_config(qwen2_5, temperature=0.0) == SamplingConfig(0.0, 1, 0.001, None, 1.05)


def test_ort_session_carries_bfloat16_through_bound_ortvalues(tmp_path):
    """onnxruntime's Python API has no numpy bf16: bf16 feeds/outputs go through bound OrtValues (ml_dtypes
    on the host side), and a resident bf16 output is fed back without leaving the OrtValue."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper

    from qwen_vl_trt.model.contracts import GraphSpec, TensorSpec
    from qwen_vl_trt.runtime.backends.ort import OrtSession

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["present_key.0"]), helper.make_node("Cast", ["x"], ["logits"], to=1)],
        "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n"])],
        [helper.make_tensor_value_info("present_key.0", TensorProto.BFLOAT16, ["n"]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    contract = GraphSpec("g", (TensorSpec("x", "bfloat16", ("n",)),),
                         (TensorSpec("present_key.0", "bfloat16", ("n",)), TensorSpec("logits", "float32", ("n",))))
    x = np.array([1.5, -2, 3.25], ml_dtypes.bfloat16)
    plain = OrtSession(tmp_path / "g.onnx", contract).run({"x": x})
    assert plain["present_key.0"].dtype == ml_dtypes.bfloat16 and plain["present_key.0"].tolist() == [1.5, -2, 3.25]
    sess = OrtSession(tmp_path / "g.onnx", contract, resident=("present_key.0",))
    out = sess.run({"x": x})
    again = sess.run({"x": out["present_key.0"]})  # an OrtValue fed back as is
    assert again["logits"].tolist() == [1.5, -2.0, 3.25]
    assert sess.run({"x": sess.allocate((3,), "bfloat16")})["logits"].tolist() == [0, 0, 0]


def test_batch_with_different_media_per_prompt_matches_hf(artifacts, media, hf_qwen3_vl, processor):
    """Python API: prompt 0 with image 1, prompt 1 with images 0 and 1: vision rows go in prompt order."""
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request

    imgs = media["images"]
    model = load_model(artifacts, "onnxruntime")
    pre = Preprocessor(model.manifest)
    cases = [(LONG_PROMPT, [imgs[1]]), ("Compare them.", [imgs[0], imgs[1]])]
    reqs = [pre.prepare(Request(p, tuple(map(str, ims)))) for p, ims in cases]
    results = generate(model, reqs, Sampler(SamplingConfig(temperature=0)), N_NEW, ignore_eos=True)
    for (prompt, ims), res in zip(cases, results):
        assert res.token_ids == hf_generate(hf_qwen3_vl, processor, prompt, ims)
