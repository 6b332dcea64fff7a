"""runtime/backends/trt.py and trt_io.py against a fake TensorRT and a fake CUDA runtime (tests/trt_fakes.py).

No GPU runs here, so this checks the host logic only: buffers planned at the profile's largest shapes and
allocated once, the engine profile checked against manifest.json's limits, the KV cache aliased in place (or
ping-ponged without the plugin), generate() through TrtBoundIO giving the tokens of a reference, the CUDA graph
cache (first run of a binding state enqueued, second captured, then replayed, also by the next generation),
a failed capture falling back to plain enqueues, and what crosses to the host per decode step (nothing with a
device sampler, the logits without). What the fakes cannot show -- TensorRT's own behaviour under capture, the
plugin's in-place write, real kernels -- is listed in docs/benchmarks.md as not verified.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from qwen_vl_trt.model.contracts import dim_ranges
from qwen_vl_trt.model.contracts import CONTRACTS
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.errors import ArtifactError
from qwen_vl_trt.runtime.generate import Model, generate
from qwen_vl_trt.model.manifest import Limits
from qwen_vl_trt.runtime.pipeline import PreparedRequest
from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig
from qwen_vl_trt.runtime.backends.trt import DeviceView, TrtSession, plan_buffers
from trt_fakes import FakeCuda, FakeEngine, fake_trt

LIMITS = Limits(max_patches=64, max_frames=2, max_batch=2, max_seq=64, max_cache_len=256)
MOD = 997  # the fake decoder's vocabulary in use


def embed_compute(ins, outs):
    outs["inputs_embeds"][...] = ins["input_ids"][..., None]  # [B, S, C]: the id in every channel
    if "deepstack_embeds" in outs:
        outs["deepstack_embeds"][...] = 0


def decoder_compute(ins, outs):
    """Writes each new token id into row past_lengths[b] + s of every cache (column 0), then puts the logits' one
    hot at (sum of the cached ids up to the position) * 31 + position mod 997: a token depends on every row."""
    emb, past, idx = ins["inputs_embeds"], ins["past_lengths"], ins["logits_index"]
    seq = emb.shape[1]
    for name in outs:
        if name.startswith("present_"):
            outs[name][...] = ins["past" + name[len("present"):]]  # out of place; in place it is the same memory
            for b in range(emb.shape[0]):
                outs[name][b, 0, past[b]:past[b] + seq, 0] = emb[b, :, 0]
    outs["logits"][...] = 0
    for b in range(emb.shape[0]):
        pos = int(past[b] + idx[b])
        total = int(outs["present_key.0"][b, 0, :pos + 1, 0].sum())
        outs["logits"][b, (total * 31 + pos) % MOD] = 1


def reference(prompt: list[int], n: int) -> list[int]:
    toks, out = list(prompt), []
    for _ in range(n):
        out.append((sum(toks) * 31 + len(toks) - 1) % MOD)
        toks.append(out[-1])
    return out


@pytest.fixture(scope="module")
def spec(qwen3_vl_ckpt):
    return ModelSpec.from_checkpoint(qwen3_vl_ckpt)


def make_model(spec, tmp_path, *, in_place: bool, cuda_graph: bool = True, profile_override=None):
    cuda, ranges = FakeCuda(), dim_ranges(LIMITS)
    contracts = {n: CONTRACTS[n](spec).resolve("float32") for n in ("embed", "decoder")}
    engines = {b"embed": FakeEngine(contracts["embed"], ranges, embed_compute),
               b"decoder": FakeEngine(contracts["decoder"], ranges, decoder_compute, profile_override)}
    trt = fake_trt(engines, cuda)
    sessions = {}
    for name, contract in contracts.items():
        (tmp_path / f"{name}.engine").write_bytes(name.encode())
        resident = tuple(t.name for t in contract.outputs if t.name.startswith("present_"))
        sessions[name] = TrtSession(tmp_path / f"{name}.engine", contract, trt, cuda, 7, ranges, resident=resident,
                                    in_place=in_place, cuda_graph=cuda_graph)
    manifest = types.SimpleNamespace(dtype="float32", limits=LIMITS, pad_token_id=0, spec=spec)
    return Model(sessions, manifest, "tensorrt"), cuda


def request(ids: list[int]) -> PreparedRequest:
    n = len(ids)
    return PreparedRequest(np.asarray(ids, np.int64), np.tile(np.arange(n, dtype=np.int64), (3, 1)), 0)


class FakeGreedy:
    """A device sampler: reads the logits in (fake) device memory, returns only the token ids."""

    def __init__(self, cuda, logits: DeviceView):
        self.cuda, self.logits = cuda, logits

    def start(self, seen):
        pass

    def sample(self):
        return self.cuda.array(self.logits.ptr, self.logits.shape, "float32").argmax(-1).astype(np.int64)


PROMPTS = ([5, 17, 3, 250, 9], [11, 2, 600])
N = 9


def run(model, cuda, device_greedy: bool, monkeypatch):
    """generate() with greedy on the fake device (FakeGreedy) or on the host (no device sampler)."""
    from qwen_vl_trt.runtime.backends import trt_io

    factory = (lambda logits, penalty: FakeGreedy(cuda, logits)) if device_greedy else (lambda *_: None)
    monkeypatch.setattr(trt_io, "_ort_device_greedy", factory)
    reqs = [request(p) for p in PROMPTS]
    return [r.token_ids for r in generate(model, reqs, Sampler(SamplingConfig(temperature=0)), N, ignore_eos=True)]


def test_plan_buffers_are_the_profile_maxima(spec):
    plan = plan_buffers(CONTRACTS["decoder"](spec).resolve("bfloat16"), dim_ranges(LIMITS))
    t = spec.text
    assert plan["past_key.0"] == ((2, t.num_key_value_heads, 256, t.head_dim), "bfloat16")
    assert plan["inputs_embeds"] == ((2, 64, t.hidden_size), "bfloat16")
    assert plan["logits"] == ((2, t.vocab_size), "float32") and plan["position_ids"] == ((3, 2, 64), "int64")


def test_engine_profile_must_match_the_manifest_limits(spec, tmp_path):
    wrong = {"past_lengths": ((1,), (1,), (8,))}  # built for max_batch 8, manifest says 2
    with pytest.raises(ArtifactError, match=r"input past_lengths has profile min \[1\] max \[8\], manifest.json "
                                            r"limits give min \[1\] max \[2\]; rebuild the engines"):
        make_model(spec, tmp_path, in_place=True, profile_override=wrong)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("device_greedy", [True, False])
def test_generate_through_static_buffers_and_graphs(spec, tmp_path, in_place, device_greedy, monkeypatch):
    model, cuda = make_model(spec, tmp_path, in_place=in_place)
    dec = model.sessions["decoder"]
    mallocs = sum(k == "malloc" for k, _ in cuda.log)
    assert mallocs == len(dec.buffers) + len(model.sessions["embed"].buffers)  # one buffer per tensor, at load
    assert ("present_key.0" in dec.buffers) != in_place  # aliased: no buffer of its own

    start = len(cuda.log)
    assert run(model, cuda, device_greedy, monkeypatch) == [reference(p, N) for p in PROMPTS]
    first = cuda.log[start:]
    past, present = dec._state["past_key.0"][1], dec._state["present_key.0"][1]
    assert (past == present) == in_place  # in place: one address; else the two sets
    states = 1 if in_place else 2  # decode binding states per engine: the ping-pong has two
    captures = [d for k, d in first if k == "capture"]
    assert len(captures) == 1 + states  # embed once, the decoder once per state
    again_start = len(cuda.log)
    assert run(model, cuda, device_greedy, monkeypatch) == [reference(p, N) for p in PROMPTS]
    again = cuda.log[again_start:]
    assert not [k for k, _ in again if k == "capture"]  # the same shape replays the graphs captured before
    assert sum(k == "launch" for k, _ in again) == 2 * (N - 1)  # every decode step: embed + decoder replays
    assert sum(k == "exec" for k, _ in again) == 2  # only the prefill's embed and decoder enqueues
    assert sum(k == "malloc" for k, _ in cuda.log) == mallocs  # nothing allocated per step or per generation

    decode_d2h = [n for k, n in again if k == "D2H"]
    vocab = spec.text.vocab_size
    if device_greedy:
        assert decode_d2h == []  # only the sampler's token ids leave the device
    else:
        assert decode_d2h == [2 * vocab * 4] * N  # the logits, once per chosen token (prefill + N-1 steps)


def test_capture_failure_falls_back_to_enqueues(spec, tmp_path, monkeypatch):
    model, cuda = make_model(spec, tmp_path, in_place=True)
    cuda.fail_capture = True
    assert run(model, cuda, True, monkeypatch) == [reference(p, N) for p in PROMPTS]
    dec = model.sessions["decoder"]
    assert not dec.graph_capture and "stream capture failed" in dec.graph_capture_error
    assert not [k for k, _ in cuda.log if k in ("capture", "launch")]


def test_without_graphs_every_step_enqueues(spec, tmp_path, monkeypatch):
    model, cuda = make_model(spec, tmp_path, in_place=True, cuda_graph=False)
    assert run(model, cuda, True, monkeypatch) == [reference(p, N) for p in PROMPTS]
    assert sum(k == "exec" for k, _ in cuda.log) == 2 * N and not [k for k, _ in cuda.log if k == "launch"]


def test_run_returns_host_arrays_or_device_views(spec, tmp_path):
    model, cuda = make_model(spec, tmp_path, in_place=True)
    emb = model.sessions["embed"]
    c, ld = spec.text.hidden_size, spec.num_deepstack
    feeds = {"input_ids": np.array([[4, 5, 6]], np.int64), "vision_features": np.zeros((0, c), np.float32),
             "deepstack_features": np.zeros((ld, 0, c), np.float32)}
    host = emb.run(feeds)
    assert host["inputs_embeds"].shape == (1, 3, c) and host["inputs_embeds"][0, :, 7].tolist() == [4, 5, 6]
    dev = emb.run(feeds, device_outputs=("inputs_embeds",))
    assert isinstance(dev["inputs_embeds"], DeviceView) and isinstance(dev["deepstack_embeds"], np.ndarray)
    assert cuda.array(dev["inputs_embeds"].ptr, (1, 3, c), "float32")[0, :, 0].tolist() == [4, 5, 6]
    with pytest.raises(Exception, match="outside the engine's profile"):
        emb.run({**feeds, "input_ids": np.zeros((3, 1), np.int64)})  # batch 3 > max_batch 2
