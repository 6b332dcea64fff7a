"""Start-up on the CPU (issue 24): the default optimized-model cache of an INT4 decoder (runtime/backends/loader.py
default_ort_cache, runtime/backends/ort_cache.py default_dir), the concurrent session creation
(runtime/backends/ort.py _open_concurrently) and runtime/startup.py load_model_and_preprocessor.

Reference: HF transformers greedy generation of the same tiny checkpoint with the same INT4 weights
(tests/test_int4.py `hf_with_int4_projections`: round-to-nearest INT4 blocks dequantized into the HF model), EOS
disabled. The runtime runs MatMulNBits at accuracy level 1 (fp32 activations, the export's default), so its tokens
equal HF's exactly, as in test_int4.py; a session from the cache runs the same kernels on the same weights, so its
tokens must equal the uncached session's and HF's. The default cache must miss when the graph files, ONNX Runtime's
version or the MatMulNBits accuracy level (a session option baked into the fused graph) change.
"""
from __future__ import annotations

import os
import shutil

import onnxruntime
import pytest
import torch

import hf_processor as H
from decoder_feeds import prefill_feeds
from qwen_vl_trt.model.errors import ArtifactError, BackendUnavailable
from qwen_vl_trt.runtime.backends import ort_cache
from qwen_vl_trt.runtime.generate import generate, load_model
from qwen_vl_trt.runtime.pipeline import Preprocessor
from qwen_vl_trt.runtime.request import Request
from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig
from qwen_vl_trt.runtime.startup import load_model_and_preprocessor
from test_int4 import PROJECTIONS, hf_with_int4_projections

N_NEW = 12
PROMPT = "Write a haiku about start-up."


@pytest.fixture(scope="module")
def int4_export(qwen3_vl_ckpt, tmp_path_factory):
    from qwen_vl_trt.export.export_all import export_all

    return export_all(qwen3_vl_ckpt, tmp_path_factory.mktemp("startup_int4"), "fp32", formats=PROJECTIONS).parent


@pytest.fixture
def art(int4_export, tmp_path):
    """A fresh copy of the INT4 artifacts (the default cache is written inside them)."""
    return shutil.copytree(int4_export, tmp_path / "art")


@pytest.fixture(scope="module")
def hf_tokens(qwen3_vl_ckpt, int4_export):
    from qwen_vl_trt.model.manifest import load_manifest

    req = Preprocessor(load_manifest(int4_export)).prepare(Request(PROMPT))
    hf = hf_with_int4_projections(qwen3_vl_ckpt)
    with torch.no_grad():
        ids = torch.as_tensor(req.input_ids)[None]
        ref = hf.generate(ids, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
    return ref[0, ids.shape[1]:].tolist()


def greedy(model, pre=None) -> list[int]:
    req = (pre or Preprocessor(model.manifest)).prepare(Request(PROMPT))
    return generate(model, [req], Sampler(SamplingConfig(temperature=0)), N_NEW, ignore_eos=True)[0].token_ids


def hits(model) -> dict:
    return {name: s.cache_hit for name, s in model.sessions.items()}


def entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_default_cache_holds_the_int4_decoder_and_matches_hf(art, hf_tokens):
    """No ort_cache asked: the INT4 decoder's optimized graph goes to ARTIFACTS/.ort-cache (vision and embed, which
    gain nothing, are not copied); the next start loads it; tokens == HF's == the uncached session's."""
    cache = art / ".ort-cache"
    first = load_model(art, "onnxruntime")
    assert hits(first) == {"vision": None, "embed": None, "decoder": False}
    names = entries(cache)
    assert len(names) == 1 and names[0].startswith("decoder.ort.onnx-")  # no half-written entry left either
    model, pre = load_model_and_preprocessor(art, "onnxruntime")
    assert hits(model) == {"vision": None, "embed": None, "decoder": True}
    assert entries(cache) == names
    uncached = load_model(art, "onnxruntime", ort_cache=False)
    assert hits(uncached) == {"vision": None, "embed": None, "decoder": None}
    assert greedy(model, pre) == hf_tokens
    assert greedy(first) == hf_tokens
    assert greedy(uncached) == hf_tokens


def test_default_cache_misses_when_accuracy_level_onnxruntime_or_graph_changes(art, monkeypatch):
    cache = art / ".ort-cache"
    load_model(art, "onnxruntime")
    # the MatMulNBits accuracy level (int4_activations) is baked into the fused graph: another entry
    assert hits(load_model(art, "onnxruntime", int4_activations="int8"))["decoder"] is False
    assert len(entries(cache)) == 2
    assert hits(load_model(art, "onnxruntime", int4_activations="int8"))["decoder"] is True
    assert hits(load_model(art, "onnxruntime"))["decoder"] is True
    with monkeypatch.context() as m:
        m.setattr(onnxruntime, "__version__", onnxruntime.__version__ + ".other")
        assert hits(load_model(art, "onnxruntime"))["decoder"] is False
    assert len(entries(cache)) == 3
    data = art / "decoder.onnx.data"
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a re-export rewrites the file
    assert hits(load_model(art, "onnxruntime"))["decoder"] is False
    assert len(entries(cache)) == 4


@pytest.fixture(scope="module")
def dense_export(qwen3_vl_ckpt, tmp_path_factory):
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits

    limits = Limits(max_patches=1024, max_batch=1, max_seq=256, max_cache_len=512)
    return export_all(qwen3_vl_ckpt, tmp_path_factory.mktemp("startup_dense"), "fp32", limits).parent


@pytest.fixture(scope="module")
def hf_dense_tokens(qwen3_vl_ckpt, hf_qwen3_vl):
    from hf_reference import hf_greedy_new_tokens

    processor = H.qwen3_processor(qwen3_vl_ckpt)
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return hf_greedy_new_tokens(hf_qwen3_vl, processor(text=[text], return_tensors="pt"), N_NEW)


def test_dense_decoder_is_prepacked_largest_weight_first_and_matches_hf(dense_export, hf_dense_tokens, tmp_path):
    """A dense decoder on ONNX Runtime's MatMul / Gemm (dense_kernel="mlas"; the default on CPUs where
    qwen_vl::MatMulF32 runs is tests/test_ort_f32_kernel.py's): the default cache holds its graph with the node of the largest weight first and
    the others in their order (runtime/backends/prepack_order.py; no weights copied), the next start reads it; every
    node and initializer is kept; tokens == HF fp32 greedy, and the decoder's outputs equal the as-exported
    session's (same kernels, same weights: only the order ONNX Runtime prepacks them in differs; fp32, rtol 1e-6)."""
    import numpy as np
    import onnx

    art = shutil.copytree(dense_export, tmp_path / "dense")
    first = load_model(art, "onnxruntime", dense_kernel="mlas")
    assert hits(first) == {"vision": None, "embed": None, "decoder": False}
    (entry,) = (art / ".ort-cache").iterdir()
    assert entry.name.startswith("decoder.ort.onnx-") and [p.name for p in entry.iterdir()] == ["graph.pb"]
    model, pre = load_model_and_preprocessor(art, "onnxruntime", dense_kernel="mlas")
    assert hits(model) == {"vision": None, "embed": None, "decoder": True}
    exported = onnx.load(str(art / "decoder.ort.onnx"), load_external_data=False)
    ordered = onnx.ModelProto.FromString((entry / "graph.pb").read_bytes())
    assert sorted(n.SerializeToString() for n in ordered.graph.node) == \
        sorted(n.SerializeToString() for n in exported.graph.node)
    assert list(ordered.graph.initializer) == list(exported.graph.initializer)
    sizes = {t.name: int(np.prod(t.dims)) for t in exported.graph.initializer}
    largest = max(sizes, key=sizes.get)
    assert largest in ordered.graph.node[0].input and largest not in exported.graph.node[0].input
    # only that node moved: the others keep the exported order (the order a step reads their packed weights in)
    assert [n.SerializeToString() for n in ordered.graph.node[1:]] == \
        [n.SerializeToString() for n in exported.graph.node if largest not in n.input]

    hf = hf_dense_tokens
    assert greedy(model, pre) == hf
    assert greedy(load_model(art, "onnxruntime", ort_cache=False)) == hf
    # one 9-token prefill step on seeded random embeddings, through both decoders (numpy feeds: host outputs)
    plain, ordered_model = (load_model(art, "onnxruntime", io_binding=False, dense_kernel="mlas", **kw)
                            for kw in ({"ort_cache": False}, {}))
    assert hits(ordered_model)["decoder"] is True
    feeds = prefill_feeds(plain.spec, np.random.default_rng(0))
    a, b = (m.sessions["decoder"].run(dict(feeds)) for m in (plain, ordered_model))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=0, err_msg=key)


def test_symlinked_graph_files_load_as_exported(dense_export, hf_dense_tokens, tmp_path):
    """ONNX Runtime refuses weights that resolve outside the folder of a graph loaded from memory: a decoder whose
    files are symlinks is loaded as exported (no reordering), and still gives HF's tokens."""
    art = tmp_path / "linked"
    art.mkdir()
    for f in dense_export.iterdir():
        if f.is_file():
            (art / f.name).symlink_to(f)
    model = load_model(art, "onnxruntime")
    assert hits(model)["decoder"] is None
    assert greedy(model) == hf_dense_tokens


def test_no_default_cache_off_the_prepacked_cpu_path(dense_export, tmp_path):
    """Mapped weights on ONNX Runtime's kernels (ort_prepack=False, dense_kernel="mlas": nothing is prepacked) and
    --ort-cache off write nothing."""
    art = shutil.copytree(dense_export, tmp_path / "dense")
    for kwargs in ({"ort_prepack": False, "dense_kernel": "mlas"}, {"ort_cache": False}):
        assert set(hits(load_model(art, "onnxruntime", **kwargs)).values()) == {None}
    assert not (art / ".ort-cache").exists()


def test_default_cache_dir_is_inside_writable_artifacts_else_in_the_user_cache(art, tmp_path, monkeypatch):
    assert ort_cache.default_dir(art) == art.resolve() / ".ort-cache"
    monkeypatch.setattr(ort_cache.os, "access", lambda path, mode: False)  # a read-only artifact folder
    user = tmp_path / "xdg"
    got = ort_cache.default_dir(art, environ={"XDG_CACHE_HOME": str(user)})
    assert got.parent == user / "qwen-vl-trt" / "ort" and len(got.name) == 16
    assert ort_cache.default_dir(tmp_path / "other", environ={"XDG_CACHE_HOME": str(user)}) != got
    assert ort_cache.default_dir(art, environ={}).parent == \
        ort_cache.Path.home() / ".cache" / "qwen-vl-trt" / "ort"


def test_a_cache_folder_that_cannot_be_made_loads_without_it(art, hf_tokens, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model = load_model(art, "onnxruntime", ort_cache=blocker / "cache")
    assert hits(model) == {"vision": None, "embed": None, "decoder": None}
    assert greedy(model) == hf_tokens


def test_a_broken_graph_is_one_error_from_the_concurrent_load(art):
    """The three sessions are created on threads: a graph ONNX Runtime cannot read is still one ArtifactError that
    names it, from load_model and from load_model_and_preprocessor (no hang, no traceback of the threads)."""
    (art / "vision.ort.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ArtifactError, match="vision.ort.onnx: onnxruntime cannot load it"):
        load_model(art, "onnxruntime")
    with pytest.raises(ArtifactError, match="vision.ort.onnx: onnxruntime cannot load it"):
        load_model_and_preprocessor(art, "onnxruntime")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        load_model_and_preprocessor(art, "nonsense")


def test_started_is_set_once_the_sessions_are_being_created(art):
    import threading

    started = threading.Event()
    load_model(art, "onnxruntime", ort_cache=False, started=started)
    assert started.is_set()


def test_trt_run_ort_cache_flag():
    """--ort-cache DIR: that folder; off: no cache (False); absent: the default cache (None)."""
    from qwen_vl_trt.runtime.serve import cli

    for flags, want in (([], None), (["--ort-cache", "off"], False), (["--ort-cache", "/some/dir"], "/some/dir")):
        cfg = cli.RunConfig.from_args(cli.parser().parse_args(["--prompt", "hi", *flags]))
        assert cfg.ort_cache == want


def test_start_up_prestarts_the_image_decode_worker(art, monkeypatch):
    """load_model_and_preprocessor starts the process's image-decode worker (runtime/media_guard.py) alongside the
    sessions; the first image request is decoded by that worker (same pid) instead of starting one; its patches
    equal those of the image decoded in this process (runtime/preprocess.py on PIL's pixels)."""
    import io
    import time

    import numpy as np
    from PIL import Image

    from qwen_vl_trt.runtime import media_guard, preprocess

    fresh = media_guard.DecodePool()  # not the process's pool, which earlier tests may have started
    monkeypatch.setattr(media_guard, "pool", lambda: fresh)
    try:
        model, pre = load_model_and_preprocessor(art, "onnxruntime")
        deadline = time.monotonic() + 30
        while not fresh._idle and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fresh._started == 1 and len(fresh._idle) == 1
        pid = fresh._idle[0].proc.pid
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buf, "PNG")
        req = pre.prepare(Request("What is this?", (buf.getvalue(),)))
        assert fresh._started == 1 and [w.proc.pid for w in fresh._idle] == [pid]
        want, _ = preprocess.preprocess_image(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), pre.image_cfg)
        np.testing.assert_array_equal(req.media[0].pixel_values, want)
    finally:
        fresh.close()
