"""The C++ runtime (runtime/cpp/, `qwen-vl-generate`) against independent references, on the CPU.

- End to end, `--backend worker` (the graphs on ONNX Runtime in a Python child, the whole loop in C++): greedy
  tokens == HF `model.generate` (EOS disabled) on request files saved from HF's own processor output: Qwen3-VL two
  images of different sizes, a Qwen3-VL video, a Qwen2.5-VL image (with its released repetition penalty 1.05),
  a text-only prompt; a ragged batch of two prompts written by `qwen-vl-request` == HF run on each prompt alone.
- `--dump-inputs`: the C++ MRoPE positions / rope deltas == HF `get_rope_index` (both families, image + video,
  padded batch), and the vision graph's host inputs == `transformers.vision_utils` (pos-embed taps, rotary ids,
  cu_seqlens; Qwen2.5-VL window index).
- `--probe-sampling`: temperature / top-k / top-p probabilities == HF's logits warpers; seeded runs reproduce.
- Bad input: one `error:` line, exit 2, no traceback, no hang.
- Build: runtime/cpp/build.sh compiled and linked the tensorrt backend where TensorRT headers, a TensorRT library
  and the CUDA runtime are present (it is never executed here: no GPU).
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
from transformers import vision_utils as vu

import hf_processor as H
from hf_reference import hf_greedy_new_tokens

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
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits

    export_all(ckpt, out, "fp32", Limits(max_batch=2, max_seq=1024, max_cache_len=1024))
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
    return hf_greedy_new_tokens(hf, inputs, N_NEW)


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
    from qwen_vl_trt.runtime.serve import request_file

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

    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.serve.request_file", "--model-dir", str(qwen3_artifacts),
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


def test_stop_ids_end_each_sequence_of_a_batch(binary, qwen3_artifacts, media, tmp_path):
    """A stop id ends a sequence after it (included, as HF); the other sequence of the batch goes on unchanged."""
    from qwen_vl_trt.runtime.serve import request_file

    req = tmp_path / "batch.safetensors"
    assert request_file.main(["--model-dir", str(qwen3_artifacts), "--image", str(media["images"][1]), "--prompt", "A?",
                              "--prompt", "Tell me more about the picture.", "--out", str(req)]) == 0
    full = [s["token_ids"] for s in generate(binary, qwen3_artifacts, req)["sequences"]]
    stop = full[0][2]
    eos = json.loads((qwen3_artifacts / "generation_config.json").read_text())["eos_token_id"]
    stops = {stop, *(eos if isinstance(eos, list) else [eos])}

    def cut(ids):
        return next((ids[:i + 1] for i, t in enumerate(ids) if t in stops), ids)

    r = subprocess.run([str(binary), "--model-dir", str(qwen3_artifacts), "--request", str(req), "--python",
                        sys.executable, "--temperature", "0", "--max-new-tokens", str(N_NEW), "--stop-id", str(stop)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    stopped = [s["token_ids"] for s in json.loads(r.stdout)["sequences"]]
    assert stopped == [cut(ids) for ids in full] and len(stopped[0]) <= 3
    # --stream: one line per position as it is chosen, then the result; the lines rebuild each sequence exactly
    # (-1 once a sequence has ended)
    r = subprocess.run([str(binary), "--model-dir", str(qwen3_artifacts), "--request", str(req), "--python",
                        sys.executable, "--temperature", "0", "--max-new-tokens", str(N_NEW), "--stop-id", str(stop),
                        "--stream"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    *lines, last = r.stdout.strip().splitlines()
    steps = [json.loads(line)["tokens"] for line in lines]
    assert json.loads(last)["sequences"] and len(steps) == max(len(ids) for ids in stopped)
    assert [[t[b] for t in steps if t[b] != -1] for b in range(2)] == stopped
    assert all(t[0] == -1 for t in steps[len(stopped[0]):])


# ---- positions and vision inputs vs HF -----------------------------------------------------------------------
def dump(binary, artifacts, request, out):
    r = subprocess.run([str(binary), "--model-dir", str(artifacts), "--request", str(request), "--dump-inputs", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return load_file(str(out))


def assert_vision_tables_match_hf(got: dict, call: int, grids: np.ndarray, vision_config):
    g, merge = torch.as_tensor(grids), vision_config.spatial_merge_size
    pre = f"vision.{call}."
    assert np.array_equal(got[pre + "grid_thw"], grids)
    assert np.array_equal(got[pre + "rotary_pos_ids"], vu.get_vision_position_ids(g, merge).numpy())
    assert np.array_equal(got[pre + "cu_seqlens"], vu.get_vision_cu_seqlens(g).numpy().astype(np.int32))
    if hasattr(vision_config, "window_size"):
        index, cu = vu.get_vision_window_index(g, spatial_merge_size=merge, window_size=vision_config.window_size,
                                               patch_size=vision_config.patch_size)
        assert np.array_equal(got[pre + "window_index"], index.numpy())
        assert np.array_equal(got[pre + "cu_window_seqlens"], cu.numpy().astype(np.int32))
    else:
        idx, wts = vu.get_vision_interpolation_indices_and_weights(
            g, num_grid_per_side=int(vision_config.num_position_embeddings**0.5), mode="bilinear", align_corners=True,
            spatial_merge_size=merge)
        assert np.array_equal(got[pre + "pos_embed_indices"], idx.numpy())
        assert np.array_equal(got[pre + "pos_embed_weights"], wts.numpy().astype(np.float32))  # bitwise


def test_qwen3_positions_and_vision_inputs_match_hf(binary, qwen3_artifacts, hf_qwen3_vl, qwen3_processor, media,
                                                    tmp_path):
    """Two images then a video in one prompt: one vision call of three items, positions across all of them."""
    inputs = hf_inputs(qwen3_processor, "Compare.", media["images"], frames=media["frames"][:9])
    got = dump(binary, qwen3_artifacts, save_request(inputs, tmp_path / "req.safetensors"), tmp_path / "dump.safetensors")
    ref_pos, ref_deltas = H.qwen3_get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 inputs["image_grid_thw"], inputs["video_grid_thw"])
    assert np.array_equal(got["position_ids"], ref_pos)
    assert np.array_equal(got["rope_deltas"], ref_deltas.reshape(-1))
    grids = np.concatenate([inputs["image_grid_thw"].numpy(), inputs["video_grid_thw"].numpy()])
    assert_vision_tables_match_hf(got, 0, grids, hf_qwen3_vl.config.vision_config)
    assert "vision.1.grid_thw" not in got


def test_qwen3_padded_batch_positions_match_hf(binary, qwen3_artifacts, media, tmp_path):
    from qwen_vl_trt.runtime.serve import request_file

    req = tmp_path / "batch.safetensors"
    assert request_file.main(["--model-dir", str(qwen3_artifacts), "--image", str(media["images"][0]), "--prompt", "Hi.",
                              "--prompt", "A much longer question about this picture.", "--out", str(req)]) == 0
    a = load_file(str(req))
    got = dump(binary, qwen3_artifacts, req, tmp_path / "dump.safetensors")
    types = (a["input_ids"] == 151655).astype(np.int64) + 2 * (a["input_ids"] == 151656)
    ref_pos, ref_deltas = H.qwen3_get_rope_index(a["input_ids"], types, a["image_grid_thw"], None, a["attention_mask"])
    assert np.array_equal(got["position_ids"], ref_pos)
    assert np.array_equal(got["rope_deltas"], ref_deltas.reshape(-1))


def test_qwen2_5_positions_and_window_index_match_hf(binary, qwen2_5_artifacts, hf_qwen2_5_vl, qwen2_5_vl_ckpt, media,
                                                     tmp_path):
    """An image then a video: the video's time axis steps by tokens_per_second * second_per_grid_ts (!= 1 here)."""
    processor = H.qwen2_5_processor(qwen2_5_vl_ckpt, do_sample_frames=True, fps=2.0)
    inputs = hf_inputs(processor, "Compare.", [media["images"][0]], frames=media["frames_2_5"])
    secs = np.asarray(inputs["second_per_grid_ts"], np.float32)
    assert secs[0] != 0.5  # interval tokens_per_second * secs != 1
    got = dump(binary, qwen2_5_artifacts, save_request(inputs, tmp_path / "req.safetensors"), tmp_path / "d.safetensors")
    types = (inputs["input_ids"] == 151655).long() + 2 * (inputs["input_ids"] == 151656).long()
    tps = int(hf_qwen2_5_vl.config.vision_config.tokens_per_second)
    ref_pos, ref_deltas = H.qwen2_5_get_rope_index(inputs["input_ids"], types, inputs["image_grid_thw"],
                                                   inputs["video_grid_thw"], secs, tokens_per_second=tps)
    assert np.array_equal(got["position_ids"], ref_pos)
    assert np.array_equal(got["rope_deltas"], ref_deltas.reshape(-1))
    grids = np.concatenate([inputs["image_grid_thw"].numpy(), inputs["video_grid_thw"].numpy()])
    assert_vision_tables_match_hf(got, 0, grids, hf_qwen2_5_vl.config.vision_config)


# ---- sampling ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.8), (1.0, 0, 0.5), (1.3, 5, 1.0), (0.5, 0, 1.0)])
def test_sampling_probabilities_match_hf_warpers(binary, tmp_path, temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 1000)) * 3).astype(np.float32)
    logits[0, :10] = 5.0  # ties at the top-k boundary (all kept, as HF)
    scores = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits))
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ref = torch.softmax(scores.double(), dim=-1).numpy()
    save_file({"logits": logits}, str(tmp_path / "logits.safetensors"))
    r = subprocess.run([str(binary), "--probe-sampling", str(tmp_path / "logits.safetensors"), "--out",
                        str(tmp_path / "p.safetensors"), "--temperature", str(temperature), "--top-k", str(top_k),
                        "--top-p", str(top_p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ours = load_file(str(tmp_path / "p.safetensors"))["probs"]
    assert np.array_equal(ours > 0, ref > 0)  # the same tokens survive
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_top_k_top_p_hand_checked_case(binary, tmp_path):
    """logits ln(0.5), ln(0.25), ln(0.15), ln(0.1): top-p 0.7 keeps {0.5, 0.25} (0.1 + 0.15 <= 0.3 dropped);
    top-k 3 drops 0.1; together: 0.5 / 0.75 and 0.25 / 0.75."""
    logits = np.log(np.array([[0.25, 0.1, 0.5, 0.15]], np.float32))
    save_file({"logits": logits}, str(tmp_path / "l.safetensors"))
    probs = {}
    for k, p in ((0, 0.7), (3, 1.0), (3, 0.7)):
        subprocess.run([str(binary), "--probe-sampling", str(tmp_path / "l.safetensors"), "--out", str(tmp_path / "p"),
                        "--temperature", "1", "--top-k", str(k), "--top-p", str(p)], check=True, timeout=60)
        probs[k, p] = load_file(str(tmp_path / "p"))["probs"][0]
    np.testing.assert_allclose(probs[0, 0.7], [1 / 3, 0, 2 / 3, 0], rtol=1e-6)
    np.testing.assert_allclose(probs[3, 1.0], [0.25 / 0.9, 0, 0.5 / 0.9, 0.15 / 0.9], rtol=1e-6)
    np.testing.assert_allclose(probs[3, 0.7], [1 / 3, 0, 2 / 3, 0], rtol=1e-6)


def test_seeded_sampling_reproduces(binary, qwen3_artifacts, qwen3_processor, tmp_path):
    req = save_request(hf_inputs(qwen3_processor, "Hello"), tmp_path / "req.safetensors")
    flags = ["--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--max-new-tokens", "8", "--ignore-eos"]

    def tokens(seed):
        r = subprocess.run([str(binary), "--model-dir", str(qwen3_artifacts), "--request", str(req), "--python",
                            sys.executable, *flags, "--seed", str(seed)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["sequences"][0]["token_ids"]

    a, b, c = tokens(1), tokens(1), tokens(2)
    assert a == b and len(a) == 8
    assert a != c  # a random-weight model is near uniform over 151k tokens: two seeds agree with ~0 probability


# ---- errors ----------------------------------------------------------------------------------------------------
def run_bad(binary, *args, timeout=60):
    r = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def good_request(qwen3_processor, media, tmp_path_factory):
    return hf_inputs(qwen3_processor, "Describe.", [media["images"][1]])


def _variant(good, path, **changes):
    tensors = {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in good.items()}
    for k, v in changes.items():
        if v is None:
            tensors.pop(k)
        else:
            tensors[k] = v
    save_file(tensors, str(path))
    return path


def test_bad_requests_are_one_line_errors(binary, qwen3_artifacts, good_request, tmp_path):
    base = ["--model-dir", qwen3_artifacts, "--python", sys.executable, "--request"]
    ids = good_request["input_ids"].numpy()
    missing = tmp_path / "nope.safetensors"
    assert "cannot open" in run_bad(binary, *base, missing)
    (tmp_path / "corrupt").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "not a valid safetensors file" in run_bad(binary, *base, tmp_path / "corrupt")
    (tmp_path / "truncated").write_bytes((tmp_path / "corrupt").read_bytes()[:5])
    assert "not a valid safetensors file" in run_bad(binary, *base, tmp_path / "truncated")
    cases = {
        "unknown tensor tokens": dict(tokens=ids),
        "input_ids is int32": dict(input_ids=ids.astype(np.int32)),
        "input_ids and attention_mask are required": dict(attention_mask=None),
        "pixel_values has": dict(pixel_values=good_request["pixel_values"].numpy()[:-4]),
        "image_grid_thw without pixel_values": dict(pixel_values=None),
        "not right padding": dict(attention_mask=np.concatenate([np.zeros((1, 1), np.int64),
                                                                 np.ones((1, ids.shape[1] - 1), np.int64)], 1)),
        "more image pad tokens": dict(input_ids=np.concatenate([ids[:, :3], np.full((1, 4), 151655), ids[:, 3:]], 1),
                                      attention_mask=np.ones((1, ids.shape[1] + 4), np.int64)),
    }
    for i, (message, change) in enumerate(cases.items()):
        assert message in run_bad(binary, *base, _variant(good_request, tmp_path / f"bad{i}.safetensors", **change))
    long = np.full((1, 1100), 100, np.int64)
    req = _variant(good_request, tmp_path / "long.safetensors", input_ids=long, attention_mask=np.ones_like(long),
                   pixel_values=None, image_grid_thw=None, mm_token_type_ids=None)
    assert "re-export with a larger --max-seq" in run_bad(binary, *base, req)
    good = _variant(good_request, tmp_path / "good.safetensors")
    assert "--max-cache-len" in run_bad(binary, *base, good, "--max-new-tokens", "5000")


def test_bad_setup_is_one_line_error(binary, qwen3_artifacts, good_request, tmp_path):
    good = _variant(good_request, tmp_path / "good.safetensors")
    assert "unknown backend" in run_bad(binary, "--model-dir", qwen3_artifacts, "--request", good, "--backend", "cuda")
    assert "unknown flag" in run_bad(binary, "--frobnicate", "1")
    assert "manifest.json not found" in run_bad(binary, "--model-dir", tmp_path, "--request", good)
    # mismatched artifacts: a Qwen3-VL request against another manifest's limits / vocabulary is caught the same way;
    # here the manifest itself is edited (another model_type)
    broken = tmp_path / "artifacts"
    broken.mkdir()
    for f in qwen3_artifacts.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "manifest.json").unlink()
    raw = json.loads((qwen3_artifacts / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**raw, "model_type": "llava"}))
    assert "not supported" in run_bad(binary, "--model-dir", broken, "--request", good)
    (broken / "manifest.json").write_text(json.dumps({**raw, "dtype": "float16"}))
    # the worker's full check (model/manifest.py) refuses fp32 contracts under a float16 dtype
    assert "contract differs" in run_bad(binary, "--model-dir", broken, "--request", good, "--python", sys.executable)
    # no engines in these artifacts: the tensorrt backend refuses (or, when not built, says so)
    msg = run_bad(binary, "--model-dir", qwen3_artifacts, "--request", good, "--backend", "tensorrt")
    assert "engine" in msg or "without the tensorrt backend" in msg or "no CUDA GPU" in msg
    # a python without qwen_vl_trt: the worker dies at start, one line
    assert "graph worker exited" in run_bad(binary, "--model-dir", qwen3_artifacts, "--request", good, "--python",
                                            "/usr/bin/python3")
    assert "graph worker exited with code 127" in run_bad(binary, "--model-dir", qwen3_artifacts, "--request", good,
                                                          "--python", tmp_path / "no-such-python")


def test_worker_exits_when_its_parent_dies(qwen3_artifacts):
    """The worker reads frames from stdin; closing it (what a dying parent does) ends it promptly and cleanly."""
    p = subprocess.Popen([sys.executable, "-m", "qwen_vl_trt.runtime.graph_worker", str(qwen3_artifacts)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    from qwen_vl_trt.runtime.graph_worker import decode, read_frame

    _, meta = decode(read_frame(p.stdout))
    assert meta["status"] == "ready"
    p.stdin.close()
    assert p.wait(timeout=30) == 0


def test_worker_ends_when_the_cpp_process_is_killed(binary, qwen3_artifacts, good_request, tmp_path):
    """SIGKILL of qwen-vl-generate mid-generation: its worker goes too (PR_SET_PDEATHSIG, then stdin EOF)."""
    import signal
    import time

    req = _variant(good_request, tmp_path / "good.safetensors")
    p = subprocess.Popen([str(binary), "--model-dir", str(qwen3_artifacts), "--request", str(req), "--python",
                          sys.executable, "--ignore-eos", "--max-new-tokens", "800"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
    deadline = time.time() + 60
    while time.time() < deadline and not children.read_text().split():
        time.sleep(0.05)
    worker = int(children.read_text().split()[0])
    time.sleep(1.0)  # the worker is up and serving
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    deadline = time.time() + 20
    while time.time() < deadline and Path(f"/proc/{worker}").exists() and \
            Path(f"/proc/{worker}/stat").read_text().split()[2] != "Z":
        time.sleep(0.05)
    alive = Path(f"/proc/{worker}").exists() and Path(f"/proc/{worker}/stat").read_text().split()[2] != "Z"
    assert not alive


# ---- build --------------------------------------------------------------------------------------------------------
def test_tensorrt_backend_compiled_and_linked_when_toolchain_present(binary):
    have = (Path("/usr/local/cuda/include/cuda_runtime_api.h").exists() and
            (ROOT / "third_party/kernel_lens/include/tensorrt/NvInferRuntime.h").exists())
    if not have:
        pytest.skip("no CUDA runtime / TensorRT headers here: the binary is built without the tensorrt backend")
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    assert "libtensorrt_rtx" in r.stdout or "libnvinfer" in r.stdout
    assert "libcudart" in r.stdout
    syms = subprocess.run(["nm", "-C", str(binary)], capture_output=True, text=True).stdout
    assert "TensorRTBackend::TensorRTBackend" in syms and "TensorRTBackend::run" in syms
    assert b"built without the tensorrt backend" not in binary.read_bytes()
