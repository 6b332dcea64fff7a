"""ONNX Runtime's CUDA EP on the tiny Qwen3-VL artifacts in bf16: what only a GPU shows (needs onnxruntime-gpu;
bench/gpu_run.sh puts it on PYTHONPATH and runs this file before the benchmark).

- the default graphs (vision.ort.onnx / decoder.ort.onnx) load on the CUDA EP, the decode step is captured as a
  CUDA graph (ONNX Runtime refuses capture when a Memcpy node or control flow is left) and the KV cache is one
  set written in place;
- greedy tokens equal HF's bf16 `generate` on the same GPU (16 tokens, EOS ignored), and the first step's logits
  agree within 0.1 (bf16: our attention, rotary and norm statistics run in fp32 where HF rounds to bf16 between
  ops; tests/test_bf16.py measures 0.02 for the same comparison emulated on the CPU);
- the plugin graphs (`--ort-graphs plugin`) give the same tokens, and a replay of the captured graphs too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu
N_NEW = 16
LOGITS_ATOL = 0.1


@pytest.fixture(scope="module")
def bf16_artifacts(qwen3_vl_ckpt, tmp_path_factory):
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits

    out = tmp_path_factory.mktemp("ort_cuda_bf16")
    export_all(qwen3_vl_ckpt, out, "bf16", Limits(max_batch=2, max_seq=512, max_cache_len=1024))
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("ort_cuda_media") / "img.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(path)
    return path


def _ours(art, image, fused: bool):
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    model = load_model(art, "onnxruntime", ort_fused=fused)
    req = Preprocessor(model.manifest).prepare(Request("Describe this image.", (str(image),)))
    greedy = Sampler(SamplingConfig(temperature=0))
    first = generate(model, [req], greedy, 1, ignore_eos=True)  # the prefill alone: its logits stay bound
    logits = np.asarray(next(iter(model.static.values())).logits.numpy(), np.float32)[0].copy()
    tokens = [generate(model, [req], greedy, N_NEW, ignore_eos=True)[0].token_ids for _ in range(2)]
    return model, first[0].token_ids, logits, tokens


def _hf(ckpt, image):
    import hf_processor as H
    from hf_reference import hf_model
    from transformers import GenerationConfig

    hf = hf_model(ckpt, "bfloat16").to("cuda")
    processor = H.qwen3_processor(ckpt)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt").to("cuda")
    gen = GenerationConfig(do_sample=False, max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=151643)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        logits = hf(**inputs).logits[0, -1].float().cpu().numpy()
        out = hf.generate(**inputs, generation_config=gen)
    return logits, out[0, inputs["input_ids"].shape[1]:].tolist()


def test_fused_graphs_on_the_cuda_ep_capture_the_decode_step_and_match_hf(bf16_artifacts, qwen3_vl_ckpt, image):
    import onnxruntime as ort

    assert "CUDAExecutionProvider" in ort.get_available_providers(), f"onnxruntime {ort.__version__} has no CUDA EP"
    model, first, logits, (tokens, replay) = _ours(bf16_artifacts, image, fused=True)
    dec = model.sessions["decoder"]
    assert dec.device == "cuda" and dec.kv_in_place
    assert dec.graph_capture, f"ONNX Runtime refused CUDA-graph capture: {dec.graph_capture_error}"
    assert len(next(iter(model.static.values())).cache.sets) == 1
    hf_logits, hf_tokens = _hf(qwen3_vl_ckpt, image)
    diff = float(np.abs(logits - hf_logits).max())
    assert diff <= LOGITS_ATOL, f"first-step logits differ from HF bf16 by {diff}"
    assert first == hf_tokens[:1] and tokens == hf_tokens and replay == tokens
    _, _, _, (plugin_tokens, _) = _ours(bf16_artifacts, image, fused=False)
    assert plugin_tokens == hf_tokens
