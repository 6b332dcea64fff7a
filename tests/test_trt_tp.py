"""runtime/backends/trt_tp.py (the TensorRT tensor-parallel decoder: one process, N GPUs, NCCL) against the fake
TensorRT and CUDA of tests/trt_fakes.py, a fake NCCL, and fake rank engines that compute their partial products
in numpy and all-reduce them through a collective that blocks until every rank has joined (as NCCL does).

The numeric reference is independent of every split: `Reference` runs the same small decoder (attention with GQA,
an MLP, an lm_head) on the whole weights over the whole token sequence, without a KV cache, in float64; the rank
engines hold 1/N of the heads, of the MLP width and of the vocabulary (KV heads replicated when N > Hkv, as
model/tp.py splits them) and write their heads of the cache. fp32 ranks vs the float64 reference: logits within
2e-5 (fp32 rounding of sums over C = 64 and N partial terms), tokens equal. Through generate (TrtBoundIO),
Session.run, the scheduler's slot prefill / prefix rows and in-flight batching; plus the loader's choice, the
one-line refusals and `export_all --tp 2` building both rank engines (TensorRT-RTX, ahead of time).

What this cannot show (listed in docs/large-models.md): TensorRT's DistCollective layers and NCCL on real GPUs,
peer copies between real devices, the engines' kernels. bench/gpu_visit.sh runs those on a lent GPU machine.
"""
from __future__ import annotations

import threading
import types

import numpy as np
import pytest

from qwen_vl_trt.model.contracts import CONTRACTS, decoder_contract, dim_ranges
from qwen_vl_trt.model.errors import ArtifactError, BackendUnavailable
from qwen_vl_trt.model.manifest import Limits
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.tp import TensorParallel, rank_spec
from qwen_vl_trt.runtime.backends import slots
from qwen_vl_trt.runtime.backends.trt_tp import TpTrtSession, open_trt_tp
from qwen_vl_trt.runtime.generate import Model, generate
from qwen_vl_trt.runtime.pipeline import PreparedRequest
from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig
from trt_fakes import FakeCuda, FakeEngine, fake_trt

LIMITS = Limits(max_patches=64, max_frames=2, max_batch=2, max_seq=64, max_cache_len=256)
MLP = 48  # the fake decoder's MLP width (its own: divisible by 1, 2, 4)
PROMPTS = ([5, 17, 3, 250, 9], [11, 2, 600])
N_NEW = 6


@pytest.fixture(scope="module")
def spec(qwen3_vl_ckpt):
    return ModelSpec.from_checkpoint(qwen3_vl_ckpt)  # 4 heads, 2 KV heads, head_dim 32, C 64, 4 layers


class Weights:
    """The small decoder's whole weights (float32), seeded."""

    def __init__(self, spec, seed: int = 3):
        t, rng = spec.text, np.random.default_rng(seed)
        self.L, self.C, self.H, self.Hkv, self.D, self.V = (t.num_hidden_layers, t.hidden_size, t.num_attention_heads,
                                                            t.num_key_value_heads, t.head_dim, t.vocab_size)
        w = lambda *shape, s=0.3: (rng.standard_normal(shape) * s / np.sqrt(shape[-2])).astype(np.float32)  # noqa: E731
        self.E = rng.standard_normal((self.V, self.C)).astype(np.float32)
        self.Wq, self.Wk, self.Wv = w(self.L, self.C, self.H * self.D), w(self.L, self.C, self.Hkv * self.D), \
            w(self.L, self.C, self.Hkv * self.D)
        self.Wo, self.W1, self.W2 = w(self.L, self.H * self.D, self.C), w(self.L, self.C, MLP), w(self.L, MLP, self.C)
        self.lm = w(self.C, self.V, s=8.0)


def reference_logits(W: Weights, tokens: list[int]) -> np.ndarray:
    """Whole weights, whole sequence, no cache, float64 -> the last position's logits [V]."""
    x = W.E[tokens].astype(np.float64)
    T, g = len(tokens), W.H // W.Hkv
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(W.L):
        q = (x @ W.Wq[layer]).reshape(T, W.H, W.D).transpose(1, 0, 2)
        k = np.repeat((x @ W.Wk[layer]).reshape(T, W.Hkv, W.D).transpose(1, 0, 2), g, axis=0)
        v = np.repeat((x @ W.Wv[layer]).reshape(T, W.Hkv, W.D).transpose(1, 0, 2), g, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(W.D) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + (p @ v).transpose(1, 0, 2).reshape(T, -1) @ W.Wo[layer]
        x = x + np.tanh(x @ W.W1[layer]) @ W.W2[layer]
    return x[-1] @ W.lm


def reference_tokens(W: Weights, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(reference_logits(W, toks).argmax()))
    return toks[len(prompt):]


class AllReduce:
    """The fake NCCL all-reduce: every rank's call blocks until all `size` ranks have joined (timeout: a rank that
    never joins breaks the barrier and the step fails), then each gets the sum in rank order."""

    def __init__(self, size: int, timeout: float = 10.0):
        self.size, self.parts = size, [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.calls = 0

    def __call__(self, rank: int, x: np.ndarray) -> np.ndarray:
        self.parts[rank] = x
        self.barrier.wait()
        total = sum(self.parts[1:], self.parts[0].copy())
        self.barrier.wait()
        self.calls += rank == 0
        return total


class FakeNccl:
    def __init__(self, all_reduce: AllReduce):
        self.all_reduce, self.calls = all_reduce, []

    def comm_init_all(self, devices):
        self.calls.append(("init_all", list(devices)))
        self.comms = [0xC0 + d for d in devices]
        return list(self.comms)

    def destroy(self, comms):
        self.calls.append(("destroy", list(comms)))


class RankEngine(FakeEngine):
    """Rank r's engine: its heads, MLP columns/rows and vocabulary rows of `Weights`; each partial sum through the
    all-reduce, which refuses to run before the context got rank r's communicator."""

    def __init__(self, W: Weights, contract, ranges, rank: int, size: int, all_reduce: AllReduce, nccl: FakeNccl):
        super().__init__(contract, ranges, self.compute_rank, name=f"decoder.rank{rank}")
        self.W, self.rank, self.size, self.reduce, self.nccl, self.context = W, rank, size, all_reduce, nccl, None

    def create_execution_context(self):
        self.context = super().create_execution_context()
        return self.context

    def all_reduce(self, x):
        assert self.context.communicator == self.nccl.comms[self.rank], "enqueued before set_communicator"
        return self.reduce(self.rank, x.astype(np.float32))

    def compute_rank(self, ins, outs):
        W, tp = self.W, TensorParallel(self.rank, self.size)
        (qlo, qhi), (klo, khi), (ilo, ihi), (vlo, vhi) = (tp.chunk(W.H), tp.kv_heads(W.Hkv), tp.chunk(MLP),
                                                          tp.vocab(W.V))
        x, past, idx = ins["inputs_embeds"].copy(), ins["past_lengths"], ins["logits_index"]
        B, S, _ = x.shape
        group, D = W.H // W.Hkv, W.D
        for layer in range(W.L):
            kc, vc = outs[f"present_key.{layer}"], outs[f"present_value.{layer}"]
            kc[...], vc[...] = ins[f"past_key.{layer}"], ins[f"past_value.{layer}"]
            k = (x @ W.Wk[layer][:, klo * D:khi * D]).reshape(B, S, khi - klo, D)
            v = (x @ W.Wv[layer][:, klo * D:khi * D]).reshape(B, S, khi - klo, D)
            for b in range(B):
                kc[b, :, past[b]:past[b] + S] = k[b].transpose(1, 0, 2)
                vc[b, :, past[b]:past[b] + S] = v[b].transpose(1, 0, 2)
            q = (x @ W.Wq[layer][:, qlo * D:qhi * D]).reshape(B, S, qhi - qlo, D)
            att = np.zeros_like(q)
            for b in range(B):
                for s in range(S):
                    n = int(past[b]) + s + 1
                    for j in range(qhi - qlo):
                        h = (qlo + j) // group - klo  # the query head's KV head, local to this rank
                        sc = kc[b, h, :n] @ q[b, s, j] / np.sqrt(D)
                        p = np.exp(sc - sc.max())
                        att[b, s, j] = (p / p.sum()) @ vc[b, h, :n]
            x = x + self.all_reduce(att.reshape(B, S, -1) @ W.Wo[layer][qlo * D:qhi * D])
            x = x + self.all_reduce(np.tanh(x @ W.W1[layer][:, ilo:ihi]) @ W.W2[layer][ilo:ihi])
        part = np.zeros((B, W.V), np.float32)
        part[:, vlo:vhi] = x[np.arange(B), idx] @ W.lm[:, vlo:vhi]
        outs["logits"][...] = self.all_reduce(part)


def open_tp(spec, tmp_path, size: int, *, in_place: bool, devices: int | None = None, trt_module=None, nccl="fake",
            timeout: float = 10.0):
    """vision + embed + the TP decoder over `size` fake GPUs, as loader._open_trt_tp opens them."""
    W, ranges = Weights(spec), dim_ranges(LIMITS)
    cuda, reduce = FakeCuda(devices=devices or size), AllReduce(size, timeout)
    nccl = FakeNccl(reduce) if nccl == "fake" else nccl  # None: the real library (runtime/backends/nccl.py)
    contracts = {n: CONTRACTS[n](spec).resolve("float32") for n in ("vision", "embed", "decoder")}
    rank_contracts = [decoder_contract(rank_spec(spec, TensorParallel(r, size))).resolve("float32")
                      for r in range(size)]

    def embed(ins, outs):
        outs["inputs_embeds"][...] = W.E[ins["input_ids"]]
        outs["deepstack_embeds"][...] = 0

    blobs = {b"vision": FakeEngine(contracts["vision"], ranges, lambda ins, outs: None),
             b"embed": FakeEngine(contracts["embed"], ranges, embed)}
    blobs.update({f"rank{r}".encode(): RankEngine(W, rank_contracts[r], ranges, r, size, reduce, nccl)
                  for r in range(size)})
    trt = trt_module or fake_trt(blobs, cuda)
    for name in ("vision", "embed", *(f"rank{r}" for r in range(size))):
        (tmp_path / f"{name}.engine").write_bytes(name.encode())
    spans = [TensorParallel(r, size).kv_heads(spec.text.num_key_value_heads) for r in range(size)]
    plugin = tmp_path / "libfake_plugins.so" if in_place else None
    if plugin is not None:  # in place: the KVCacheAttention plugin engines (the fake library only has to load)
        trt.get_plugin_registry = lambda: types.SimpleNamespace(load_library=lambda path: object())
        plugin.write_bytes(b"")
    sessions = open_trt_tp({n: tmp_path / f"{n}.engine" for n in ("vision", "embed")},
                           [tmp_path / f"rank{r}.engine" for r in range(size)], contracts, rank_contracts, spans,
                           plugin, ranges, trt=trt, cudart=cuda, nccl=nccl)
    manifest = types.SimpleNamespace(dtype="float32", limits=LIMITS, pad_token_id=0, spec=spec)
    return Model(sessions, manifest, "tensorrt"), cuda, W, nccl


def request(ids):
    return PreparedRequest(np.asarray(ids, np.int64), np.tile(np.arange(len(ids), dtype=np.int64), (3, 1)), 0)


def greedy(model):
    return [r.token_ids for r in generate(model, [request(p) for p in PROMPTS], Sampler(SamplingConfig(temperature=0)),
                                          N_NEW, ignore_eos=True)]


@pytest.fixture(autouse=True)
def host_sampling(monkeypatch):
    """No onnxruntime-gpu here: the logits are copied to the host (trt_io._choose)."""
    from qwen_vl_trt.runtime.backends import trt_io

    monkeypatch.setattr(trt_io, "_ort_device_greedy", lambda *_: None)


@pytest.fixture(scope="module")
def expected(spec):
    W = Weights(spec)
    return [reference_tokens(W, p, N_NEW) for p in PROMPTS]


@pytest.mark.parametrize("size", [2, 4])  # 4 > Hkv = 2: every KV head is held by two ranks
@pytest.mark.parametrize("in_place", [True, False])
def test_generate_over_ranks_equals_the_whole_model(spec, tmp_path, size, in_place, expected):
    model, cuda, W, nccl = open_tp(spec, tmp_path, size, in_place=in_place)
    dec = model.sessions["decoder"]
    assert isinstance(dec, TpTrtSession) and dec.graph_capture is False
    assert nccl.calls == [("init_all", list(range(size)))]
    comms = [d for k, d in cuda.log if k == "communicator"]
    assert sorted(comms) == [(f"decoder.rank{r}", 0xC0 + r) for r in range(size)]  # rank r: device r's comm

    # every rank's cache holds only its KV heads: no whole-model cache buffer on any device
    t = spec.text
    rank_cache = LIMITS.max_batch * (t.num_key_value_heads * 1 // min(size, t.num_key_value_heads)) \
        * LIMITS.max_cache_len * t.head_dim * 4
    whole_cache = rank_cache * min(size, t.num_key_value_heads)
    sizes = [n for k, n in cuda.log if k == "malloc"]
    assert rank_cache in sizes and whole_cache not in sizes

    start = len(cuda.log)
    assert greedy(model) == expected
    first_exec = next(i for i, (k, _) in enumerate(cuda.log) if k == "exec")
    assert max(i for i, (k, _) in enumerate(cuda.log) if k == "communicator") < first_exec
    log = cuda.log[start:]
    # per step: the N enqueues all happen before any stream synchronisation
    execs = [i for i, (k, d) in enumerate(log) if k == "exec" and str(d).startswith("decoder.rank")]
    syncs = [i for i, (k, _) in enumerate(log) if k == "sync"]
    assert len(execs) == size * N_NEW  # prefill + N_NEW - 1 decode steps, every rank, no graph replays
    for step in range(N_NEW):
        block = execs[step * size:(step + 1) * size]
        assert not [s for s in syncs if block[0] < s < block[-1]], "a sync between the ranks' enqueues"
        assert sorted(log[i][1] for i in block) == [f"decoder.rank{r}" for r in range(size)]
    assert sum(k == "peer" for k, _ in log) >= (size - 1) * N_NEW  # inputs replicated from rank 0 every step
    # rank r > 0 records an event behind each enqueue, which stream 0 waits for before the next copies into it
    assert sum(k == "record" and d != dec.stream for k, d in log) == (size - 1) * N_NEW
    first_peer = next(i for i, (k, _) in enumerate(log) if k == "peer")
    assert [d for k, d in log[:first_peer] if k == "wait"][-(size - 1):] == [dec.stream] * (size - 1)
    assert sum(k == "malloc" for k, _ in log) == 0  # nothing allocated per step
    assert greedy(model) == expected  # the static IO again (cache emptied, same buffers)


def test_run_logits_and_cache_equal_the_whole_model(spec, tmp_path):
    """Session.run with host feeds: logits = the reference's, present_* = the whole model's K rows put back
    together from the ranks (TP 4: replicated KV heads)."""
    model, cuda, W, _ = open_tp(spec, tmp_path, 4, in_place=True)
    dec, t = model.sessions["decoder"], spec.text
    toks = PROMPTS[0]
    T, K = len(toks), 16
    cache = np.zeros((1, t.num_key_value_heads, K, t.head_dim), np.float32)
    feeds = {"inputs_embeds": W.E[toks][None], "deepstack_embeds": np.zeros((spec.num_deepstack, 1, T, t.hidden_size),
                                                                             np.float32),
             "position_ids": np.tile(np.arange(T), (3, 1, 1)), "past_lengths": np.zeros(1, np.int64),
             "logits_index": np.array([T - 1])}
    feeds.update({f"past_{kv}.{i}": cache for i in range(t.num_hidden_layers) for kv in ("key", "value")})
    out = dec.run(feeds)
    np.testing.assert_allclose(out["logits"][0], reference_logits(W, toks), rtol=2e-5, atol=2e-5)
    k0 = (W.E[toks].astype(np.float64) @ W.Wk[0]).reshape(T, t.num_key_value_heads, t.head_dim).transpose(1, 0, 2)
    np.testing.assert_allclose(out["present_key.0"][0, :, :T], k0, rtol=1e-5, atol=1e-5)
    assert not out["present_key.0"][0, :, T:].any()
    nxt = int(out["logits"][0].argmax())  # one decode step on the cache returned (host arrays split per rank)
    step = {**feeds, "inputs_embeds": W.E[[nxt]][None], "deepstack_embeds": feeds["deepstack_embeds"][:, :, :1],
            "position_ids": np.full((3, 1, 1), T), "past_lengths": np.array([T]), "logits_index": np.array([0])}
    step.update({f"past{n[len('present'):]}": v for n, v in out.items() if n.startswith("present_")})
    np.testing.assert_allclose(dec.run(step)["logits"][0], reference_logits(W, [*toks, nxt]), rtol=2e-5, atol=2e-5)


def test_slot_prefill_and_prefix_rows_reach_every_rank_holding_the_head(spec, tmp_path, expected):
    """The scheduler's slot prefill (slots.prefill_slot) and prefix rows (read_rows / write_rows) through the
    virtual whole-model cache views: TP 4, each KV head on two ranks."""
    from qwen_vl_trt.runtime.backends.decode_io import decode_io

    model, cuda, W, _ = open_tp(spec, tmp_path, 4, in_place=True)
    t = spec.text
    io = decode_io(model, 2, 32)
    io.reset()
    toks = PROMPTS[1]
    feeds = {"inputs_embeds": W.E[toks][None], "deepstack_embeds": np.zeros((spec.num_deepstack, 1, len(toks),
                                                                             t.hidden_size), np.float32),
             "position_ids": np.tile(np.arange(len(toks)), (3, 1, 1))}
    logits = slots.prefill_slot(io, 1, feeds, 0)
    np.testing.assert_allclose(logits, reference_logits(W, toks), rtol=2e-5, atol=2e-5)
    rows = slots.read_rows(io, 1, len(toks))
    k0 = (W.E[toks].astype(np.float64) @ W.Wk[0]).reshape(len(toks), t.num_key_value_heads, t.head_dim)
    np.testing.assert_allclose(rows["past_key.0"], k0.transpose(1, 0, 2), rtol=1e-5, atol=1e-5)

    marked = {n: np.full_like(r, 7.0) for n, r in rows.items()}
    slots.write_rows(io, 0, marked)
    dec = model.sessions["decoder"]
    view = io.cache.buffers["past_key.0"]
    for r, rv in enumerate(dec.caches["past_key.0"].rank_views(view)):  # both holders of each head got the rows
        arr = cuda.array(rv.ptr, rv.shape, "float32")
        assert (arr[0, :, :len(toks)] == 7.0).all(), f"rank {r}"
        np.testing.assert_allclose(arr[1, :, :len(toks)], k0.transpose(1, 0, 2)[list(range(*dec.spans[r]))],
                                   rtol=1e-5, atol=1e-5)


def test_enqueueing_one_rank_then_waiting_deadlocks_the_collective(spec, tmp_path):
    """Why the session enqueues every rank before anything waits: one rank alone never gets past its first
    all-reduce (the fake collective times out where NCCL would hang)."""
    model, cuda, W, _ = open_tp(spec, tmp_path, 2, in_place=True, timeout=0.5)
    dec = model.sessions["decoder"]
    io = dec.decode_io(model, 1, 16)
    io.reset()
    toks = PROMPTS[0]
    dec.bind({"inputs_embeds": W.E[toks][None], "deepstack_embeds": np.zeros((spec.num_deepstack, 1, len(toks),
                                                                               spec.text.hidden_size), np.float32),
              "position_ids": np.tile(np.arange(len(toks)), (3, 1, 1)), "past_lengths": np.zeros(1, np.int64),
              "logits_index": np.array([len(toks) - 1]), **io.cache.buffers}, io.cache.targets())
    with pytest.raises(threading.BrokenBarrierError):
        dec.ranks[0].execute()


def test_refusals_are_one_line(spec, tmp_path, monkeypatch):
    with pytest.raises(BackendUnavailable, match=r"^a --tp 2 export needs 2 GPUs, 1 visible"):
        open_tp(spec, tmp_path, 2, in_place=False, devices=1)
    with pytest.raises(BackendUnavailable, match=r"TensorRT old has no DistCollective layers / set_communicator: "
                                                 r"tensor-parallel engines need TensorRT >= 10\.16"):
        open_tp(spec, tmp_path, 2, in_place=False,
                trt_module=types.SimpleNamespace(__version__="old", LayerType=types.SimpleNamespace()))
    from qwen_vl_trt.runtime.backends import nccl as nccl_mod

    monkeypatch.setattr(nccl_mod, "library_path", lambda: str(tmp_path / "no" / "libnccl.so.2"))
    with pytest.raises(BackendUnavailable, match=r"^NCCL is not installed .*; pip install nvidia-nccl-cu13"):
        open_tp(spec, tmp_path, 2, in_place=False, nccl=None)


def test_missing_rank_engine(spec, tmp_path):
    contracts = {n: CONTRACTS[n](spec).resolve("float32") for n in ("vision", "embed", "decoder")}
    (tmp_path / "rank0.engine").write_bytes(b"rank0")
    with pytest.raises(ArtifactError, match=r"rank1\.engine is missing: a --tp 2 export needs one engine per rank"):
        open_trt_tp({}, [tmp_path / "rank0.engine", tmp_path / "rank1.engine"], contracts, [], [], None, {},
                    trt=object(), cudart=object(), nccl=object())


def test_loader_picks_the_tp_session_for_rank_engines(spec, tmp_path, monkeypatch):
    """open_sessions: a --tp 2 manifest with rank engines -> open_trt_tp with every rank's engine, contract (its KV
    heads) and head span; without rank engines --backend tensorrt is refused in one line."""
    from qwen_vl_trt.model.weight_formats import WeightFormats
    from qwen_vl_trt.runtime.backends import loader, trt_tp

    seen = {}
    monkeypatch.setattr(loader, "tensorrt_available", lambda: (True, ""))
    monkeypatch.setattr(trt_tp, "open_trt_tp", lambda *a, **k: seen.update(args=a, kw=k) or {"decoder": "tp"})
    ranks = [tmp_path / "decoder.rank0.engine", tmp_path / "decoder.rank1.engine"]
    manifest = types.SimpleNamespace(
        tp=2, spec=spec, dtype="float32", limits=LIMITS, directory=tmp_path,
        contracts={n: CONTRACTS[n](spec).resolve("float32") for n in ("vision", "embed", "decoder")},
        weight_formats=WeightFormats, plugin_library=lambda: None, rank_engine_paths=lambda: ranks,
        engine_paths=lambda: {n: tmp_path / f"{n}.engine" for n in ("vision", "embed")} | {"decoder": ranks[0]})
    assert loader.open_sessions(manifest, "auto") == ("tensorrt", {"decoder": "tp"})
    engines, rank_engines, _, rank_contracts, spans, plugin, _ = seen["args"]
    assert rank_engines == ranks and spans == [(0, 1), (1, 2)] and plugin is None
    assert [c.inputs[[t.name for t in c.inputs].index("past_key.0")].dims[1] for c in rank_contracts] == [1, 1]
    manifest.rank_engine_paths = lambda: []
    with pytest.raises(ArtifactError, match="has no TensorRT engines"):
        loader.open_sessions(manifest, "tensorrt")


def test_export_all_builds_one_engine_per_rank(tmp_path):
    """export_all.sh --tp 2 with TensorRT (here TensorRT-RTX, ahead of time for SM89; no GPU runs them): vision,
    embed and decoder.rank{0,1}.engine, listed in manifest.json, which the loader reads back."""
    import subprocess
    import sys

    from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_TINY, make_checkpoint
    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.model.trt_compat import rtx_env

    ckpt = make_checkpoint(tmp_path / "ckpt", "qwen3_vl", seed=5,
                           config_overrides={"text_config": {**QWEN3_VL_TINY["text_config"], "intermediate_size": 48}})
    out = tmp_path / "tp2"
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.export_all", str(ckpt), str(out), "--dtype",
                        "bf16", "--tp", "2", "--max-patches", "1024", "--max-batch", "2", "--max-seq", "256",
                        "--max-cache-len", "512", "--compute-capabilities", "8.9"],
                       capture_output=True, text=True, env=rtx_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = load_manifest(out)
    assert manifest.tp == 2
    assert [p.name for p in manifest.rank_engine_paths()] == ["decoder.rank0.engine", "decoder.rank1.engine"]
    assert manifest.engine_paths()["decoder"].name == "decoder.rank0.engine"
    for path in [*manifest.rank_engine_paths(), manifest.engine_paths()["vision"], manifest.engine_paths()["embed"]]:
        assert path.read_bytes()[:4] in (b"vtrt", b"ftrt"), path.name
    assert "decoder.rank1.onnx: 9 DIST_COLLECTIVE layers parsed" in r.stdout + r.stderr  # 2 per layer + lm_head


def test_in_flight_scheduler_with_mixed_arrivals_and_a_reused_prefix(spec, tmp_path, expected):
    """runtime/scheduler.py on the TP session (TP 4, KV heads replicated): a request arrives while another decodes,
    prompts are written in chunks of 3 tokens, the third request reuses the first one's prefix rows (prefix cache:
    slots.write_rows into every rank holding each head); each request's tokens == the whole-model reference."""
    from qwen_vl_trt.runtime.scheduler import Engine, SeqRequest

    model, cuda, W, _ = open_tp(spec, tmp_path, 4, in_place=True)
    model.manifest.eos_token_ids = ()
    engine = Engine(model, prefill_budget=3)
    third = [*PROMPTS[0][:4], 77, 31]
    reqs = [SeqRequest(request(p), N_NEW, SamplingConfig(temperature=0), ignore_eos=True)
            for p in (PROMPTS[0], PROMPTS[1], third)]
    engine.submit(reqs[0])
    for _ in range(3):
        engine.step()
    engine.submit(reqs[1])  # arrives while the first decodes
    engine.run_until_idle()
    hits = engine.cache_stats()["prefix_cache_hits"]
    engine.submit(reqs[2])  # after both: its first 4 rows can come from the prefix cache
    engine.run_until_idle()
    assert [r.token_ids for r in reqs[:2]] == expected
    assert reqs[2].token_ids == reference_tokens(W, third, N_NEW)
    assert engine.cache_stats()["prefix_cache_hits"] > hits  # the third prompt started from reused rows
