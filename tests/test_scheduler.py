"""In-flight batching (runtime/scheduler.py): requests that join and leave the batch at every step give the tokens
they give alone.

Artifacts: the tiny Qwen3-VL ones of test_generate.py (export_all.sh, fp32, max batch 2, cache 1024). References:
HF `generate` greedy for each request alone (tests/test_generate.py `hf_generate`: HF's processor, EOS off,
N_NEW tokens); a request stopped after n tokens must give HF's first n. Seeded sampling is compared with our own
`generate` of that request alone (HF draws from torch's generator, which no numpy sampler reproduces; the
sampler itself is checked against HF's warpers in test_generate.py). Token ids are compared exactly: HF's greedy
choice is the reference and the tiny fp32 model's top logits are far apart (test_generate.py compares the same way).

Graph flavours: decoder.ort.onnx with the cache written in place (each prompt in one call: runtime/backends/slots.py), the
plugin graph decoder.onnx with two ping-pong KV sets (one call), and decoder.onnx with numpy I/O (HostIO), where
prompts are written in chunks of PREFILL_BUDGET tokens (the chunked path TensorRT's in-place cache takes).
"""
from __future__ import annotations

import numpy as np
import pytest

from test_generate import N_NEW, artifacts, hf_generate, media, processor  # noqa: F401 (fixtures)

PREFILL_BUDGET = 48  # < every prompt with media here: those prompts are written in several chunks
FLAVOURS = {"fused": dict(ort_fused=True), "plugin": dict(ort_fused=False),
            "plugin_host": dict(ort_fused=False, io_binding=False)}


def cases(media):  # noqa: F811
    imgs, frames_dir = media["images"], str(media["frames_dir"])
    return {  # name -> (prompt, images, video)
        "image": ("Describe this image.", (str(imgs[0]),), None),
        "two_images": ("Compare them.", (str(imgs[0]), str(imgs[1])), None),
        "video": ("What happens?", (), frames_dir),
        "text": ("Write a haiku about GPUs.", (), None),
        "long_text": ("What colours do you see in the top left corner of this picture? Answer in one short "
                      "sentence, then explain why in two more sentences.", (), None),
    }


@pytest.fixture(scope="module")
def hf_tokens(media, hf_qwen3_vl, processor):  # noqa: F811
    """name -> HF's N_NEW greedy tokens for that request alone."""
    return {name: hf_generate(hf_qwen3_vl, processor, prompt, [str(p) for p in imgs],
                              frames=media["frames"] if video else None)
            for name, (prompt, imgs, video) in cases(media).items()}


@pytest.fixture(scope="module", params=list(FLAVOURS))
def model(request, artifacts):  # noqa: F811
    from qwen_vl_trt.runtime.generate import load_model

    return load_model(artifacts, "onnxruntime", **FLAVOURS[request.param])


@pytest.fixture(scope="module")
def prepared(model, media):  # noqa: F811
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request

    pre = Preprocessor(model.manifest)
    return {name: pre.prepare(Request(prompt, imgs, video)) for name, (prompt, imgs, video) in cases(media).items()}


def seq(prepared, name, max_new, sampling=None, **kw):
    from qwen_vl_trt.runtime.sampling import SamplingConfig
    from qwen_vl_trt.runtime.scheduler import SeqRequest

    return SeqRequest(prepared[name], max_new, sampling or SamplingConfig(temperature=0), ignore_eos=True, **kw)


def drive(engine, arrivals: list) -> None:
    """arrivals: (step, SeqRequest) sorted by step; submit each at its step, step until all are done."""
    i, step = 0, 0
    while i < len(arrivals) or engine.busy:
        while i < len(arrivals) and arrivals[i][0] <= step:
            engine.submit(arrivals[i][1])
            i += 1
        engine.step()
        step += 1


@pytest.mark.parametrize("order_seed", [0, 1])
def test_random_arrivals_match_hf_alone(model, prepared, hf_tokens, order_seed):
    """Random arrival steps and order, five kinds of request, different lengths, three ending early (max tokens,
    a stop from on_token): each request's tokens == HF's for it alone."""
    from qwen_vl_trt.runtime.scheduler import Engine

    rng = np.random.default_rng(order_seed)
    names = list(rng.permutation(list(hf_tokens)))
    limits = dict(zip(names, [N_NEW, 5, N_NEW, 11, N_NEW]))
    stop_after = {names[2]: 7}  # on_token says "stop" at the 7th token (a stop string, as the server does)
    reqs = {}
    for name in names:
        n = stop_after.get(name)
        reqs[name] = seq(prepared, name, limits[name])
        if n:
            reqs[name].on_token = lambda tok, r=reqs[name], n=n: len(r.token_ids) >= n
    steps = np.sort(rng.integers(0, 40, len(names)))
    engine = Engine(model, prefill_budget=PREFILL_BUDGET)
    drive(engine, list(zip(steps, (reqs[n] for n in names))))
    for name in names:
        want = hf_tokens[name][:stop_after.get(name, limits[name])]
        assert reqs[name].token_ids == want, name
        assert reqs[name].finish_reason == ("stop" if name in stop_after else "length")
    assert all(s is None for s in engine.slots)


def test_seeded_sampling_equals_the_request_alone(model, prepared):
    """Three sampled requests with different settings (one with a repetition penalty) and a greedy one share the
    batch; each gives the tokens our `generate` gives it alone with the same settings."""
    from qwen_vl_trt.runtime.generate import generate
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig
    from qwen_vl_trt.runtime.scheduler import Engine

    settings = [("image", SamplingConfig(temperature=0.9, top_k=50, top_p=0.9, seed=3)),
                ("text", SamplingConfig(temperature=1.3, seed=11, repetition_penalty=1.2)),
                ("long_text", SamplingConfig(temperature=0)),
                ("two_images", SamplingConfig(temperature=0.7, top_p=0.8, seed=5))]
    alone = [generate(model, [prepared[name]], Sampler(cfg), 12, ignore_eos=True)[0].token_ids
             for name, cfg in settings]
    reqs = [seq(prepared, name, 12, cfg) for name, cfg in settings]
    engine = Engine(model, prefill_budget=PREFILL_BUDGET)
    drive(engine, [(0, reqs[0]), (0, reqs[1]), (3, reqs[2]), (4, reqs[3])])
    assert [r.token_ids for r in reqs] == alone


def test_a_used_slot_holds_no_stale_rows(model, prepared, hf_tokens):
    """One slot: a long image prompt runs to its end, then a short text prompt in the same slot == HF alone (the
    image prompt's cache rows beyond the new prompt are still there; they must never be attended)."""
    from qwen_vl_trt.runtime.scheduler import Engine

    engine = Engine(model, max_batch=1, prefill_budget=PREFILL_BUDGET)
    first, second = seq(prepared, "image", N_NEW), seq(prepared, "text", N_NEW)
    assert prepared["image"].num_tokens > prepared["text"].num_tokens + N_NEW
    drive(engine, [(0, first), (0, second)])
    assert first.token_ids == hf_tokens["image"] and second.token_ids == hf_tokens["text"]


def test_cancellation_frees_the_slot_at_the_next_step(model, prepared, hf_tokens):
    """Cancel a request mid-generation: at the next step its slot is free and a waiting request takes it; the
    request that shares the batch is undisturbed."""
    from qwen_vl_trt.runtime.scheduler import Engine

    engine = Engine(model, prefill_budget=PREFILL_BUDGET)
    cancelled, other = seq(prepared, "text", N_NEW), seq(prepared, "image", N_NEW)
    waiting = seq(prepared, "long_text", 8)
    ended = []
    cancelled.on_end = ended.append
    engine.submit(cancelled)
    engine.submit(other)
    while len(cancelled.token_ids) < 4:
        engine.step()
    slot = next(b for b, s in enumerate(engine.slots) if s is not None and s.request is cancelled)
    cancelled.cancelled.set()  # the client goes away
    engine.submit(waiting)
    engine.step()
    assert ended == ["cancelled"] and cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) == 4
    assert engine.slots[slot] is not None and engine.slots[slot].request is waiting
    n = 4
    engine.run_until_idle()
    assert cancelled.token_ids == hf_tokens["text"][:n]
    assert other.token_ids == hf_tokens["image"] and waiting.token_ids == hf_tokens["long_text"][:8]


def test_device_greedy_steps_match_hf(model, prepared, hf_tokens):
    """Steps whose slots are all plain greedy take the IO's device greedy (runtime/backends/device_sampling.py; on the CPU EP
    here, switched on as tests/test_decode_io.py does); a sampled slot in the batch sends the step to the host, and
    numpy I/O has no device greedy at all."""
    from qwen_vl_trt.runtime.sampling import SamplingConfig
    from qwen_vl_trt.runtime.scheduler import Engine

    engine = Engine(model, prefill_budget=PREFILL_BUDGET)
    has_device_greedy = hasattr(engine.io, "device_greedy")  # numpy I/O (HostIO) has none: all on the host
    engine.io.device_greedy = True
    first, second = seq(prepared, "image", N_NEW), seq(prepared, "text", N_NEW)
    sampled = seq(prepared, "long_text", 3, SamplingConfig(temperature=0.8, seed=1))
    used = []
    decode = engine.io.decode
    engine.io.decode = lambda *a: (used.append(engine.io.greedy is not None), decode(*a))[1]
    drive(engine, [(0, sampled), (0, first), (6, second)])  # both prompts go in at step 0
    assert first.token_ids == hf_tokens["image"] and second.token_ids == hf_tokens["text"]
    assert not used[0] and any(used) == has_device_greedy  # the sampled slot's steps on the host


def test_a_request_over_the_cache_fails_alone(model, prepared, hf_tokens):
    from qwen_vl_trt.runtime.scheduler import Engine

    engine = Engine(model, prefill_budget=PREFILL_BUDGET)
    errors = []
    bad = seq(prepared, "text", model.manifest.limits.max_cache_len, on_error=lambda s, m: errors.append((s, m)))
    good = seq(prepared, "text", 6)
    drive(engine, [(0, bad), (0, good)])
    assert errors and errors[0][0] == 400 and "cache" in errors[0][1]
    assert good.token_ids == hf_tokens["text"][:6]
