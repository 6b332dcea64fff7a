"""The decode step's I/O paths on ONNX Runtime's CPU EP (runtime/backends/decode_io.py, device_sampling.py, ort.py, ort_io.py) and
the image fast path (preprocess.patchify_image).

What the CUDA EP needs and is checked here with the same code on the CPU EP, for both decoder files
(decoder.ort.onnx: one KV set written in place by GroupQueryAttention; decoder.onnx: two sets): every decode-step
input and output bound once at a fixed address (no binding, no allocation per step), the KV sets, a graph id
always run with the one binding it was first run with (a captured CUDA graph keeps its addresses), new ids for a
new shape, prefill never captured, static buffers reused by the next generation of the same shape and zeroed;
device greedy == host greedy (with HF's repetition penalty, ties, several steps); tokens equal across the host,
bound and device-greedy paths (HF equality of these tokens: tests/test_generate.py). Only the CUDA graph capture
itself, ONNX Runtime's CUDA kernels and the device memset run on a GPU alone (bench/bench_pipeline.py).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwen_vl_trt.runtime import preprocess as pp
from qwen_vl_trt.runtime.backends.device_sampling import DeviceGreedy
from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig
from qwen_vl_trt.runtime.backends.ort import cuda_provider_options

N_NEW = 12


@pytest.fixture(scope="module")
def artifacts(qwen3_vl_ckpt, tmp_path_factory):
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits

    out = tmp_path_factory.mktemp("decode_io_artifacts")
    export_all(qwen3_vl_ckpt, out, "fp32", Limits(max_batch=2, max_seq=512, max_cache_len=1024))
    return out


@pytest.fixture(params=[True, False], ids=["ort_fused", "plugin_graph"])
def fused(request):
    """load_model's ort_fused: decoder.ort.onnx (in-place KV, one set) or decoder.onnx (ping-pong, two sets)."""
    return request.param


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("decode_io_media") / "img.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(path)
    return path


def prepared(model, image, prompts=("Describe this image.",)):
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request

    pre = Preprocessor(model.manifest)
    return [pre.prepare(Request(p, (str(image),))) for p in prompts]


def run(model, reqs, n=N_NEW, **cfg):
    from qwen_vl_trt.runtime.generate import generate

    return [r.token_ids for r in generate(model, reqs, Sampler(SamplingConfig(temperature=0, **cfg)), n,
                                          ignore_eos=True)]


class RecordingSession:
    """Wraps an InferenceSession: records (binding, gpu_graph_id) of every run_with_iobinding."""

    def __init__(self, sess):
        self.sess, self.runs = sess, []

    def run_with_iobinding(self, binding, run_options=None):
        gid = None if run_options is None else run_options.get_run_config_entry("gpu_graph_id")
        self.runs.append((binding, gid))
        return self.sess.run_with_iobinding(binding, run_options)

    def __getattr__(self, name):
        return getattr(self.sess, name)


def bound_values(io) -> dict:
    """Address of every buffer the bound decode step uses."""
    bufs = {"input_ids": io.input_ids, "logits": io.logits, **io.small, **io.embeds}
    for p, kv in enumerate(io.cache.sets):
        bufs.update({f"{name}@{p}": v for name, v in kv.items()})
    return {name: v.data_ptr() for name, v in bufs.items()}


def test_bound_step_is_static_and_graph_ids_keep_their_bindings(artifacts, image, fused):
    """Simulated graph capture on the CPU EP: the decoder session reports graph_capture, so decode runs carry
    gpu_graph_id (ignored by the CPU EP) exactly as on the CUDA EP."""
    from qwen_vl_trt.runtime.backends.ort_io import OrtBoundIO
    from qwen_vl_trt.runtime.generate import load_model

    model = load_model(artifacts, "onnxruntime", ort_fused=fused)
    sets = 1 if fused else 2
    dec = model.sessions["decoder"]
    dec.graph_capture = True  # what the CUDA EP session reports; RunOptions now carry gpu_graph_id
    dec.sess = RecordingSession(dec.sess)
    reqs = prepared(model, image)
    first = run(model, reqs)
    (key, io), = model.static.items()
    assert isinstance(io, OrtBoundIO) and key == (1, 256)  # graph capture: cache_len a power of two >= 256
    addresses = bound_values(io)
    again = run(model, reqs)  # same shape: the same object, the same buffers, the same graph ids
    assert again == first and next(iter(model.static.values())) is io and bound_values(io) == addresses
    by_id = {}
    for binding, gid in dec.sess.runs:
        if gid == "-1":
            assert binding not in io.bindings  # prefill: a one-off binding, never captured
            continue
        assert gid in {str(g) for g in io.graph_ids}
        assert by_id.setdefault(gid, binding) is binding  # one graph id, one binding, forever
    assert len(io.cache.sets) == sets and len(by_id) == sets  # one graph per KV set
    assert sum(gid == "-1" for _, gid in dec.sess.runs) == 2  # two prefills
    assert sum(gid != "-1" for _, gid in dec.sess.runs) == 2 * (N_NEW - 1)
    old_ids = set(io.graph_ids)
    run(model, prepared(model, image, ("Describe this image.", "And this one?")))  # batch 2: a new shape
    (key2, io2), = model.static.items()
    assert key2[0] == 2 and io2 is not io and not old_ids & set(io2.graph_ids)


def test_bound_generation_reuses_zeroed_cache_and_ping_pongs(artifacts, image, fused):
    from qwen_vl_trt.runtime.generate import load_model

    model = load_model(artifacts, "onnxruntime", ort_fused=fused)
    reqs = prepared(model, image)
    a = run(model, reqs)
    io = next(iter(model.static.values()))
    assert io.cache.current == (0 if fused else N_NEW % 2)  # prefill + N_NEW-1 decode steps, each swaps two sets
    assert int(io.cache.past_lengths[0]) == reqs[0].num_tokens + N_NEW - 1
    garbage = np.full(io.cache.shape, 7.0, np.float32)
    for kv in io.cache.sets:  # poison both sets: the next generation must not see any of it
        for buf in kv.values():
            buf.update_inplace(garbage)
    assert run(model, reqs) == a


@pytest.mark.parametrize("penalty", [1.0, 1.05])
def test_bound_device_greedy_and_host_paths_give_the_same_tokens(artifacts, image, penalty, fused):
    from qwen_vl_trt.runtime.generate import load_model

    host = load_model(artifacts, "onnxruntime", io_binding=False, ort_fused=False)  # decoder.onnx, numpy feeds
    bound = load_model(artifacts, "onnxruntime", ort_fused=fused)
    device = load_model(artifacts, "onnxruntime", ort_fused=fused)
    reqs = prepared(host, image, ("Describe this image.", "What colours do you see in the corners? Be brief."))
    want = run(host, reqs, 20, repetition_penalty=penalty)
    assert run(bound, reqs, 20, repetition_penalty=penalty) == want
    run(device, reqs, 20)  # builds the static IO of this shape; switch its greedy to the device path, go again
    io = next(iter(device.static.values()))
    io.device_greedy = True
    assert run(device, reqs, 20, repetition_penalty=penalty) == want
    assert io.greedy is not None and io.greedy.penalty == penalty


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.8])
def test_device_greedy_equals_host_sampler(penalty):
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    batch, vocab = 3, 1000
    logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, vocab), np.float32))
    greedy = DeviceGreedy(ort, ["CPUExecutionProvider"], logits, batch, vocab, penalty, "cpu")
    host = Sampler(SamplingConfig(temperature=0, repetition_penalty=penalty))
    prompts = [rng.integers(0, vocab, 30) for _ in range(batch)]
    host.start(prompts, vocab)
    greedy.start(host.seen)
    for step in range(6):
        x = (rng.standard_normal((batch, vocab)) * 2).astype(np.float32)
        x[0, :4] = x.max() + 1  # a tie at the top: the first index wins on both sides
        x[1, prompts[1][:5]] = x.max() + 0.5  # prompt tokens at the top: the penalty decides
        logits.update_inplace(x)
        assert greedy.sample().tolist() == host.sample(x).tolist(), step


def test_cuda_provider_options():
    plain, graph = cuda_provider_options(False), cuda_provider_options(True)
    assert "enable_cuda_graph" not in plain and graph["enable_cuda_graph"] == "1"
    assert plain["arena_extend_strategy"] == "kSameAsRequested" and plain["cudnn_conv_algo_search"] == "HEURISTIC"


def test_graph_capture_refused_falls_back(artifacts, monkeypatch):
    """ONNX Runtime refuses enable_cuda_graph (control flow, copies between devices): the session is made
    without it and says why; the decode path is then the plain bound one."""
    import onnxruntime as ort

    from qwen_vl_trt.runtime.backends.ort import OrtSession

    real = ort.InferenceSession
    seen = []

    def fake(path, opts=None, providers=None, **kw):
        seen.append(providers)
        if any(isinstance(p, tuple) and p[1].get("enable_cuda_graph") == "1" for p in providers):
            raise RuntimeError("This session cannot use the CUDA Graph feature as requested by the user as the "
                               "model has control flow nodes which can't be supported by CUDA Graphs.")
        return real(path, opts, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", fake)
    from qwen_vl_trt.model.manifest import load_manifest

    manifest = load_manifest(artifacts)
    sess = OrtSession(artifacts / "decoder.onnx", manifest.contracts["decoder"],
                      providers=("CUDAExecutionProvider", "CPUExecutionProvider"), graph_capture=True)
    assert not sess.graph_capture and "control flow" in sess.graph_capture_error
    assert sess.new_graph_id() is None and sess.run_options(None) is None
    assert seen[0][0] == ("CUDAExecutionProvider", cuda_provider_options(True))
    assert seen[1][0] == ("CUDAExecutionProvider", cuda_provider_options(False))


@pytest.mark.parametrize("size,patch,merge,mean,std", [
    ((64, 96), 16, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # Qwen3-VL
    ((56, 140), 14, 2, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # Qwen2.5-VL
    ((448, 448), 16, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
])
def test_patchify_image_is_bit_identical(size, patch, merge, mean, std):
    cfg = pp.ImageProcessorConfig(min_pixels=1, max_pixels=1 << 30, patch_size=patch, temporal_patch_size=2,
                                  merge_size=merge, image_mean=mean, image_std=std)
    chw = np.random.default_rng(size[0]).integers(0, 256, (3, *size), dtype=np.uint8)
    chw[:, 0, :4] = [[0, 1, 254, 255]] * 3  # the extreme levels
    ours, grid = pp.patchify_image(chw, cfg)
    ref, ref_grid = pp.patchify(pp.fused_normalize(chw, cfg)[None], patch, merge, 2)
    assert grid == ref_grid and ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))  # bits, not values


def test_fused_decoder_writes_the_cache_in_place(artifacts, image):
    """decoder.ort.onnx with present bound to past: after the prefill the one KV set holds exactly the prompt's rows
    (the rows HF's cache holds, compared with decoder.onnx's ping-pong output) at the same addresses; every row
    beyond stays zero."""
    from qwen_vl_trt.runtime.generate import load_model

    results = {}
    for fused in (True, False):
        model = load_model(artifacts, "onnxruntime", ort_fused=fused)
        reqs = prepared(model, image)
        run(model, reqs, n=1)  # the prefill only
        io = next(iter(model.static.values()))
        assert len(io.cache.sets) == (1 if fused else 2)
        results[fused] = {k: v.numpy().copy() for k, v in io.cache.buffers.items()}
        if fused:
            before = {k: v.data_ptr() for k, v in io.cache.buffers.items()}
            assert io.bindings[0] is not None and before == {k: v.data_ptr() for k, v in io.cache.sets[0].items()}
    n = reqs[0].num_tokens
    for name, kv in results[True].items():
        np.testing.assert_allclose(kv[:, :, :n], results[False][name][:, :, :n], rtol=0, atol=1e-5)
        assert np.abs(kv[:, :, :n]).max() > 0 and not kv[:, :, n:].any(), name
