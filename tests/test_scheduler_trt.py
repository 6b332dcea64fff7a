"""The in-flight engine (runtime/scheduler.py) over TrtSession's static buffers: slot views, chunked prompts into
the in-place cache, one prompt call with ping-pong sets, the decode step's CUDA graphs -- on the fake TensorRT and
CUDA runtime of tests/trt_fakes.py (no GPU here).

The fake decoder of tests/test_trt_session.py writes every token id into its cache row and picks the next token
from the sum of ALL cached ids of the sequence up to its position, so a token comes out right only if every row
of its slot holds its own sequence (no row of another slot, no stale row of a former occupant, no missing chunk).
Reference: `reference(prompt, n)` there, the same rule in plain Python.
"""
from __future__ import annotations

import pytest

from qwen_vl_trt.runtime.sampling import SamplingConfig
from qwen_vl_trt.runtime.scheduler import Engine, SeqRequest
from test_trt_session import FakeGreedy, make_model, reference, request, spec  # noqa: F401 (fixture)

PROMPTS = ([5, 17, 3, 250, 9, 41, 7, 12, 99, 3, 8], [11, 2, 600], [300, 1, 1, 4, 77, 5], [9] * 20, [42, 43])
LENGTHS = (9, 4, 12, 6, 10)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("device_greedy", [True, False])
def test_engine_through_static_buffers(spec, tmp_path, in_place, device_greedy, monkeypatch):  # noqa: F811
    from qwen_vl_trt.runtime.backends import trt_io

    model, cuda = make_model(spec, tmp_path, in_place=in_place)
    factory = (lambda logits, penalty: FakeGreedy(cuda, logits)) if device_greedy else (lambda *_: None)
    monkeypatch.setattr(trt_io, "_ort_device_greedy", factory)
    model.manifest.eos_token_ids = ()
    engine = Engine(model, prefill_budget=4)  # prompts of more than 4 tokens go in chunks where allowed
    assert engine.chunked == in_place
    seqs = [SeqRequest(request(p), n, SamplingConfig(temperature=0)) for p, n in zip(PROMPTS, LENGTHS)]
    arrivals = {0: seqs[:2], 3: seqs[2:3], 5: seqs[3:]}  # 5 requests, 2 slots: every slot is reused
    step = 0
    while step <= max(arrivals) or engine.busy:
        for s in arrivals.get(step, []):
            engine.submit(s)
        engine.step()
        step += 1
    assert [s.token_ids for s in seqs] == [reference(p, n) for p, n in zip(PROMPTS, LENGTHS)]
    launches = sum(k == "launch" for k, _ in cuda.log)
    assert launches > 0  # decode steps replay captured graphs while slots come and go
    vocab_bytes = spec.text.vocab_size * 4
    logits_out = [n for k, n in cuda.log if k == "D2H" and n >= vocab_bytes]
    steps = engine.steps  # decode steps; each prompt's last call also brings its one logits row to the host
    assert len(logits_out) == len(PROMPTS) + (0 if device_greedy else steps)


@pytest.mark.parametrize("in_place", [True, False])
def test_prefix_rows_through_static_buffers(spec, tmp_path, in_place, monkeypatch):  # noqa: F811
    """The prefix cache over TensorRT's static buffers: rows copied out of a slot per head on the stream, copied
    into another slot (the in-place set; with ping-pong sets the one the next call reads), the rest of the prompt
    from there. A second prompt shares 6 tokens of the first; a third continues the first's prompt and 3 of its
    generated tokens (a chat's next turn). The fake decoder's tokens depend on every row of the slot: == the
    reference, and the hits are the shared lengths."""
    from qwen_vl_trt.runtime.backends import trt_io

    model, cuda = make_model(spec, tmp_path, in_place=in_place)
    monkeypatch.setattr(trt_io, "_ort_device_greedy", lambda *_: None)
    model.manifest.eos_token_ids = ()
    engine = Engine(model, prefill_budget=4)
    first = [5, 17, 3, 250, 9, 41, 7, 12]
    n = 9
    generated = reference(first, n)
    prompts = [first, first[:6] + [99, 3, 8], first + generated[:3] + [4, 4]]
    seqs = [SeqRequest(request(p), n, SamplingConfig(temperature=0)) for p in prompts]
    engine.submit(seqs[0])
    engine.run_until_idle()
    hits = engine.cache_stats()["prefix_cache_hits"]
    engine.submit(seqs[1])
    engine.submit(seqs[2])
    engine.run_until_idle()
    assert [s.token_ids for s in seqs] == [reference(p, n) for p in prompts]
    assert hits == 0 and engine.cache_stats()["prefix_cache_hits"] == 6 + len(first) + 3
