"""ONNX Runtime's optimized-model cache (runtime/backends/ort_cache.py) and the memory-mapped weights of dense graphs
on the CPU provider (runtime/backends/ort.py weights_mapped).

Reference: HF transformers greedy generation on the same tiny checkpoint (fp32, EOS disabled), as in
tests/test_generate.py. A cached session must give HF's tokens, and its outputs must equal the uncached session's
within fp32 rounding (same kernels; the optimizer's passes are split between the save at ORT_ENABLE_EXTENDED and the
load, which may reorder a fused op's summation: rtol 1e-5, atol 1e-6). The cache must miss when the graph files,
ONNX Runtime's version, the providers or the session config change.
These tests are of ONNX Runtime's own kernels (MLAS, prepacked or on mapped weights): every load passes
dense_kernel="mlas" (`--dense-kernel mlas`); the dense decoder on qwen_vl::MatMulF32, which always runs on mapped
weights, is tests/test_ort_f32_kernel.py's.
"""
from __future__ import annotations

import os

import numpy as np
import onnxruntime
import pytest

import hf_processor as H
from decoder_feeds import prefill_feeds
from hf_reference import hf_greedy_new_tokens
from qwen_vl_trt.model.contracts import Limits
from qwen_vl_trt.runtime.backends import ort_cache
from qwen_vl_trt.runtime.generate import generate, load_model
from qwen_vl_trt.runtime.pipeline import Preprocessor
from qwen_vl_trt.runtime.request import Request
from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

N_NEW = 12
PROMPT = "Write a haiku about caches."


@pytest.fixture(scope="module")
def artifacts(qwen3_vl_ckpt, tmp_path_factory):
    from qwen_vl_trt.export.export_all import export_all

    limits = Limits(max_patches=1024, max_batch=1, max_seq=256, max_cache_len=512)
    return export_all(qwen3_vl_ckpt, tmp_path_factory.mktemp("ort_cache_artifacts"), "fp32", limits).parent


@pytest.fixture(scope="module")
def hf_tokens(qwen3_vl_ckpt, hf_qwen3_vl):
    processor = H.qwen3_processor(qwen3_vl_ckpt)
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return hf_greedy_new_tokens(hf_qwen3_vl, processor(text=[text], return_tensors="pt"), N_NEW)


def greedy(model) -> list[int]:
    req = Preprocessor(model.manifest).prepare(Request(PROMPT))
    return generate(model, [req], Sampler(SamplingConfig(temperature=0)), N_NEW, ignore_eos=True)[0].token_ids


def hits(model) -> dict:
    return {name: s.cache_hit for name, s in model.sessions.items()}


def entries(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def test_second_load_hits_the_cache_and_matches_hf(artifacts, hf_tokens, tmp_path):
    cache = tmp_path / "ort-cache"
    first = load_model(artifacts, "onnxruntime", dense_kernel="mlas", ort_cache=cache)
    assert hits(first) == {"vision": False, "embed": False, "decoder": False}
    names = entries(cache)
    assert len(names) == 3 and not any(n.startswith(".") for n in names)  # no half-written entry left
    assert all((cache / n / "model.onnx").is_file() and (cache / n / "model.onnx.data").is_file() for n in names)
    second = load_model(artifacts, "onnxruntime", dense_kernel="mlas", ort_cache=cache)
    assert hits(second) == {"vision": True, "embed": True, "decoder": True}
    assert entries(cache) == names
    assert greedy(first) == hf_tokens
    assert greedy(second) == hf_tokens


def test_cached_decoder_outputs_equal_the_uncached_ones(artifacts, tmp_path, rng):
    """One 9-token prefill step of decoder.ort.onnx (seeded random embeddings, empty 64-row cache) through the plain
    session and through a cache hit: logits and the written cache rows."""
    cache = tmp_path / "ort-cache"
    load_model(artifacts, "onnxruntime", dense_kernel="mlas", ort_cache=cache)
    models = [load_model(artifacts, "onnxruntime", dense_kernel="mlas", io_binding=False),
              load_model(artifacts, "onnxruntime", dense_kernel="mlas", io_binding=False, ort_cache=cache)]
    assert models[1].sessions["decoder"].cache_hit
    feeds = prefill_feeds(models[0].spec, rng)
    plain, cached = (m.sessions["decoder"].run(dict(feeds)) for m in models)
    assert set(plain) == set(cached)
    for name in plain:
        np.testing.assert_allclose(cached[name], plain[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_cache_misses_when_a_graph_file_changes(artifacts, tmp_path):
    cache = tmp_path / "ort-cache"
    load_model(artifacts, "onnxruntime", dense_kernel="mlas", ort_cache=cache)
    data = artifacts / "decoder.onnx.data"
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a re-export rewrites the file
    again = load_model(artifacts, "onnxruntime", dense_kernel="mlas", ort_cache=cache)
    assert hits(again) == {"vision": True, "embed": True, "decoder": False}
    assert len(entries(cache)) == 4


def test_cache_misses_when_onnxruntime_version_changes(artifacts, tmp_path, monkeypatch):
    cache = tmp_path / "ort-cache"
    load_model(artifacts, "onnxruntime", dense_kernel="mlas", ort_cache=cache)
    monkeypatch.setattr(onnxruntime, "__version__", onnxruntime.__version__ + ".other")
    again = load_model(artifacts, "onnxruntime", dense_kernel="mlas", ort_cache=cache)
    assert hits(again) == {"vision": False, "embed": False, "decoder": False}
    assert len(entries(cache)) == 6


def test_cache_misses_when_session_config_changes(artifacts, tmp_path):
    """Prepacked (ort_prepack) and memory-mapped sessions are different entries."""
    cache = tmp_path / "ort-cache"
    load_model(artifacts, "onnxruntime", dense_kernel="mlas", ort_cache=cache)
    again = load_model(artifacts, "onnxruntime", dense_kernel="mlas", ort_cache=cache, ort_prepack=False)
    assert hits(again) == {"vision": False, "embed": False, "decoder": False}


def test_cache_key_covers_providers_version_config_and_files(artifacts):
    graph = artifacts / "decoder.ort.onnx"
    cpu = ("CPUExecutionProvider",)
    base = ort_cache.cache_key(graph, cpu, {}, "1.32.0")
    assert ort_cache.cache_key(graph, ("CUDAExecutionProvider", *cpu), {}, "1.32.0") != base
    assert ort_cache.cache_key(graph, cpu, {}, "1.33.0") != base
    assert ort_cache.cache_key(graph, cpu, {"session.disable_prepacking": "1"}, "1.32.0") != base
    assert ort_cache.cache_key(graph, cpu, {}, "1.32.0") == base
    # decoder.ort.onnx reads decoder.onnx.data: both are part of its key
    assert {p.name for p in ort_cache.graph_files(graph)} >= {"decoder.onnx", "decoder.onnx.data", "decoder.ort.onnx"}


def test_dense_graphs_run_on_mapped_weights_on_the_cpu(artifacts):
    """Dense graphs on the CPU provider with ort_prepack=False: prepacking off (weights used where ONNX Runtime maps
    them); the default keeps ONNX Runtime's prepacking."""
    mapped = load_model(artifacts, "onnxruntime", dense_kernel="mlas", ort_prepack=False)
    packed = load_model(artifacts, "onnxruntime", dense_kernel="mlas")
    for name in ("vision", "embed", "decoder"):
        opts = mapped.sessions[name].sess.get_session_options()
        assert opts.get_session_config_entry("session.disable_prepacking") == "1"
        with pytest.raises(Exception):  # not set at all: ONNX Runtime's default (prepacking on)
            packed.sessions[name].sess.get_session_options().get_session_config_entry("session.disable_prepacking")


def test_trt_run_ort_weights_mapped_runs_on_mapped_weights_and_matches_hf(artifacts, hf_tokens, monkeypatch):
    """trt-run --ort-weights mapped: every session is created with prepacking off, and the greedy tokens are HF's;
    without the flag (prepacked, the default) the same tokens with prepacking on."""
    import io

    from qwen_vl_trt.runtime import startup
    from qwen_vl_trt.runtime.serve import cli

    loaded, real = [], startup.load_model_and_preprocessor

    def spy(*args, **kwargs):
        model, pre = real(*args, **kwargs)
        loaded.append(model)
        return model, pre

    monkeypatch.setattr(startup, "load_model_and_preprocessor", spy)
    flags = ["--model-dir", str(artifacts), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(N_NEW),
             "--ignore-eos", "--json", "--backend", "onnxruntime", "--dense-kernel", "mlas"]
    for extra, mapped in (([], False), (["--ort-weights", "mapped"], True)):
        results = cli.run(cli.RunConfig.from_args(cli.parser().parse_args(flags + extra)), io.StringIO(), io.StringIO())
        assert results[0].token_ids == hf_tokens
        for name, session in loaded[-1].sessions.items():
            opts = session.sess.get_session_options()
            if mapped:
                assert opts.get_session_config_entry("session.disable_prepacking") == "1", name
            else:
                with pytest.raises(Exception):  # not set: ONNX Runtime's default, prepacking on
                    opts.get_session_config_entry("session.disable_prepacking")
