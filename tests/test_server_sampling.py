"""The OpenAI / vLLM sampling and output fields of the server (issue 21 item 3) over HTTP, against references.

Server and artifacts: tests/test_server.py's (tiny random-weight Qwen3-VL, fp32 ONNX Runtime, max batch 2, the
in-flight engine). References:
- logprobs: HF `generate(output_logits=True)` greedy on the same chat (HF's processor and template); its raw
  logits through torch's `log_softmax` (vLLM's default logprobs_mode is raw_logprobs: the logits before any
  processing). Tolerance 2 x FP32_ATOL: the fp32 graphs' logits are within FP32_ATOL of HF's
  (tests/tolerances.py) and a log-softmax moves by at most twice a uniform logit error;
- min_p: HF `generate(do_sample=True, min_p=1.0)`: min_p 1 keeps only the most likely token, so both sides are
  deterministic whatever their random generators;
- min_tokens / stop_token_ids: HF `generate` greedy with `min_new_tokens` and the stop token as an EOS id
  (HF's MinNewTokensLengthLogitsProcessor; vLLM's min_tokens also holds back stop_token_ids);
- include_stop_str_in_output / skip_special_tokens: HF's tokenizer `decode` of HF's tokens;
- structured outputs: the `jsonschema` validator, `re.fullmatch`, the choice list; the unconstrained requests
  that share the in-flight batch with a constrained one: HF greedy tokens;
- n: each choice is the request alone with seed + index (vLLM's parallel sampling), greedy choices HF's.
"""
from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import numpy as np
import pytest

from test_generate import N_NEW, artifacts, media, processor  # noqa: F401 (fixtures)
from test_server import (greedy, hf_chat, hf_text, image_chat, post, server, static_server,  # noqa: F401 (fixtures)
                         stream)
from tolerances import FP32_ATOL

HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "colours", "ok"], "additionalProperties": False}


def hf_run(hf, processor, messages, images=(), **gen) -> tuple[list[int], list]:  # noqa: F811
    """HF `generate` on the chat -> (new tokens, raw logits [V] per step); EOS off unless `eos_token_id` given."""
    import torch
    from PIL import Image
    from transformers import GenerationConfig

    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {"images": [Image.open(p).convert("RGB") for p in images]} if images else {}
    inputs = processor(text=[text], return_tensors="pt", **kwargs)
    own = hf.generation_config
    settings = {"do_sample": False, "max_new_tokens": N_NEW, "eos_token_id": None, "pad_token_id": 0, **gen}
    saved, own.eos_token_id = own.eos_token_id, settings["eos_token_id"]
    try:
        with torch.no_grad():
            out = hf.generate(**inputs, generation_config=GenerationConfig(**settings), output_logits=True,
                              return_dict_in_generate=True)
    finally:
        own.eos_token_id = saved
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), [x[0].float() for x in out.logits]


@pytest.fixture(scope="module")
def hf_haiku(hf_qwen3_vl, processor):  # noqa: F811
    return hf_run(hf_qwen3_vl, processor, HAIKU)


def content(r: dict, i: int = 0) -> str:
    return r["choices"][i]["message"]["content"]


def test_logprobs_match_hf_log_softmax(server, hf_haiku, processor):  # noqa: F811
    import torch

    tokens, logits = hf_haiku
    status, r = post(server, greedy(HAIKU, logprobs=True, top_logprobs=5))
    assert status == 200 and content(r) == hf_text(processor, tokens)
    entries = r["choices"][0]["logprobs"]["content"]
    assert len(entries) == N_NEW
    tok = processor.tokenizer
    for entry, token, step in zip(entries, tokens, logits):
        ref = torch.log_softmax(step, dim=-1).numpy()
        assert entry["token"] == tok.decode([token]) and entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == pytest.approx(float(ref[token]), abs=2 * FP32_ATOL)
        top = np.argsort(-ref)[:5]
        assert [t["token"] for t in entry["top_logprobs"]] == [tok.decode([int(i)]) for i in top]
        np.testing.assert_allclose([t["logprob"] for t in entry["top_logprobs"]], ref[top], atol=2 * FP32_ATOL)
    # streamed: the same entries, spread over the chunks
    chunks = [json.loads(p) for p in stream(server, greedy(HAIKU, logprobs=True, top_logprobs=5))[:-1]]
    streamed = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    # the second request reuses the first one's prompt rows (the prefix cache is on by default): the same tokens,
    # the logprobs equal to fp32 rounding (a prefill continued from cached rows sums in another order)
    assert [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in streamed] == \
        [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in entries]
    np.testing.assert_allclose([[e["logprob"]] + [t["logprob"] for t in e["top_logprobs"]] for e in streamed],
                               [[e["logprob"]] + [t["logprob"] for t in e["top_logprobs"]] for e in entries],
                               atol=2 * FP32_ATOL)
    # logprobs off: null, as OpenAI
    status, r = post(server, greedy(HAIKU, max_tokens=2))
    assert r["choices"][0]["logprobs"] is None


def test_min_p_one_is_hf_sampling_with_min_p_one(server, hf_qwen3_vl, processor):  # noqa: F811
    tokens, _ = hf_run(hf_qwen3_vl, processor, HAIKU, do_sample=True, temperature=1.0, min_p=1.0, top_k=0)
    status, r = post(server, {"messages": HAIKU, "max_tokens": N_NEW, "temperature": 1.0, "min_p": 1.0,
                              "top_k": 0, "top_p": 1.0, "seed": 5, "ignore_eos": True})
    assert status == 200 and content(r) == hf_text(processor, tokens)


def test_stop_token_ids_and_min_tokens_match_hf(server, hf_haiku, hf_qwen3_vl, processor):  # noqa: F811
    greedy_tokens = hf_haiku[0]
    stop = greedy_tokens[2]  # the 3rd greedy token, made a stop token
    eos = list(hf_qwen3_vl.generation_config.eos_token_id)
    body = {"messages": HAIKU, "max_tokens": N_NEW, "temperature": 0, "stop_token_ids": [stop]}
    status, r = post(server, body)
    ref, _ = hf_run(hf_qwen3_vl, processor, HAIKU, eos_token_id=eos + [stop])
    assert ref[-1] == stop and len(ref) == greedy_tokens.index(stop) + 1
    assert status == 200 and r["choices"][0]["finish_reason"] == "stop"
    assert content(r) == hf_text(processor, ref[:-1])  # the stop token's own text is not output (vLLM)
    assert r["usage"]["completion_tokens"] == len(ref)
    status, r = post(server, {**body, "include_stop_str_in_output": True})
    assert content(r) == hf_text(processor, ref)
    # min_tokens holds the stop token back (HF: min_new_tokens over the same EOS ids)
    status, r = post(server, {**body, "min_tokens": 6})
    ref, _ = hf_run(hf_qwen3_vl, processor, HAIKU, eos_token_id=eos + [stop], min_new_tokens=6)
    assert len(ref) > 6 and ref[:3] != greedy_tokens[:3]
    assert r["usage"]["completion_tokens"] == len(ref)
    assert content(r) == hf_text(processor, ref[:-1] if ref[-1] in eos + [stop] else ref)


def test_stop_string_kept_with_include_stop_str_in_output(server, hf_haiku, processor):  # noqa: F811
    text = hf_text(processor, hf_haiku[0])
    stop = text[12:15]
    status, r = post(server, greedy(HAIKU, stop=[stop], include_stop_str_in_output=True))
    assert status == 200 and r["choices"][0]["finish_reason"] == "stop"
    assert content(r) == text[:text.index(stop) + len(stop)]
    streamed = [json.loads(p) for p in stream(server, greedy(HAIKU, stop=[stop], include_stop_str_in_output=True))[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == content(r)


def test_skip_special_tokens_false_keeps_special_token_text(processor, server):  # noqa: F811
    """A job's text with special tokens among its ids: HF's tokenizer decode with the same flag."""
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.serve.serving import Job

    tok = processor.tokenizer
    ids = tok("a <|vision_start|>b<|im_start|> c")["input_ids"] + [151645]
    for skip in (True, False):
        job = Job(None, 100, Request("x", skip_special_tokens=skip, include_stop_str_in_output=not skip))
        job.start(server.pre.tokenizer, [151645])
        for t in ids:
            job.push(t)
        events = []
        while not job.events.empty():
            events.append(job.events.get_nowait())
        text = "".join(e[1] for e in events if e[0] == "delta")
        assert text == tok.decode(ids, skip_special_tokens=skip)
        assert events[-1][:2] == ("done", "stop")


def test_stop_filter_include_and_min_tokens_arming():
    """Hand-checked: with include the text ends after the stop string; a stop string wholly inside pieces fed
    before min_tokens (not armed) is not a match (vLLM looks from min_tokens on), one completed after is."""
    from qwen_vl_trt.runtime.serve.serving import StopFilter

    f = StopFilter(("END", "ENDING"), include=True)  # holds back 5 characters (len("ENDING") - 1)
    assert f.feed("abc EN") == ("a", False)
    assert f.feed("DING more") == ("bc ENDING", True)  # the first match, the longer stop string there
    f = StopFilter(("STOP",))  # holds back 3
    assert f.feed("a STOP b", armed=False) == ("a STO", False)
    assert f.feed(" c ST", armed=True) == ("P b c", False)  # the STOP fed unarmed is past
    assert f.feed("OP d", armed=True) == (" ", True)


def test_n_choices_are_seeded_requests_alone(server, hf_haiku, processor):  # noqa: F811
    body = {"messages": HAIKU, "max_tokens": 8, "temperature": 0.9, "seed": 11, "ignore_eos": True}
    status, r = post(server, {**body, "n": 3})
    assert status == 200 and [c["index"] for c in r["choices"]] == [0, 1, 2]
    alone = [post(server, {**body, "seed": 11 + i})[1] for i in range(3)]
    assert [content(r, i) for i in range(3)] == [content(a) for a in alone]
    assert len({content(r, i) for i in range(3)}) > 1  # different seeds, different texts
    assert r["usage"]["completion_tokens"] == 24 and r["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]
    # greedy n = 2: both HF's tokens; streamed per index
    status, r = post(server, greedy(HAIKU, n=2))
    assert [content(r, i) for i in range(2)] == [hf_text(processor, hf_haiku[0])] * 2
    chunks = [json.loads(p) for p in stream(server, greedy(HAIKU, n=2, stream_options={"include_usage": True}))[:-1]]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert "".join(ch["delta"].get("content", "") for ch in mine) == content(r, i)
        assert mine[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == r["usage"] and r["usage"]["completion_tokens"] == 2 * N_NEW


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}},
    {"structured_outputs": {"json": SCHEMA}},
    {"guided_json": json.dumps(SCHEMA)},
])
def test_json_schema_output_validates(server, extra):  # noqa: F811
    body = {"messages": [{"role": "user", "content": "Describe a person as JSON."}], "max_tokens": 120, **extra}
    for sampled in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        status, r = post(server, {**body, **sampled})
        assert status == 200 and r["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(content(r)), SCHEMA)
        chunks = [json.loads(p) for p in stream(server, {**body, **sampled})[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == content(r)


def test_regex_choice_and_json_object_outputs(server):  # noqa: F811
    base = {"messages": [{"role": "user", "content": "Answer."}], "max_tokens": 60, "temperature": 0.8, "seed": 1}
    pattern = r"[0-9]{3}-[a-z]{2,5}"
    for extra in ({"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}):
        status, r = post(server, {**base, **extra})
        assert status == 200 and re.fullmatch(pattern, content(r)) and r["choices"][0]["finish_reason"] == "stop"
    options = ["yes", "no", "maybe later"]
    for extra in ({"structured_outputs": {"choice": options}}, {"guided_choice": options}):
        status, r = post(server, {**base, **extra, "n": 3})
        assert status == 200 and all(content(r, i) in options for i in range(3))
    # json_object: any object. The random model under it writes keys of random tokens that seldom end (greedy runs
    # to max_tokens inside its first key); seed 4 closes the object at once.
    json_object = {**base, "max_tokens": 40, "response_format": {"type": "json_object"}}
    status, r = post(server, {**json_object, "seed": 4})
    assert status == 200 and r["choices"][0]["finish_reason"] == "stop" and json.loads(content(r)) == {}
    status, r = post(server, {**json_object, "temperature": 0})
    assert r["choices"][0]["finish_reason"] == "length" and content(r).startswith('{"')


def test_constrained_and_unconstrained_share_the_batch(server, media, hf_qwen3_vl, processor,  # noqa: F811
                                                      monkeypatch):
    """A json_schema stream and an unconstrained image request run in the same decode steps (the engine is
    watched); the schema holds and the unconstrained text is HF's.

    The engine admits the two together: left to arrival times, the short JSON stream could end before the image
    request's preprocessing and vision were done (seen once on CI: no shared step), which tests the clock, not
    the batch. Admission is held until both wait (at most 120 s; past that the overlap assertion fails)."""
    engine = server.scheduler.engine
    together, decode, admit = [], engine._decode, engine._admit
    deadline = time.monotonic() + 120

    def watched():
        feeding = [s for s in engine.slots if s is not None and s.next_token is not None]
        together.append(len(feeding) == 2 and any(s.request.constraint is not None for s in feeding))
        decode()

    def held_admit():
        idle = all(s is None for s in engine.slots)
        if idle and engine.waiting.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine thread lets the HTTP threads run while the second request comes
            return
        admit()

    monkeypatch.setattr(engine, "_decode", watched)
    monkeypatch.setattr(engine, "_admit", held_admit)
    img = media["images"][0]
    constrained = {"messages": [{"role": "user", "content": "Describe a person as JSON."}], "max_tokens": 120,
                   "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}
    out = {}
    threads = [threading.Thread(target=lambda: out.update(json=stream(server, constrained))),
               threading.Thread(target=lambda: out.update(plain=post(server, greedy(image_chat(img)))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sum(together) >= 5  # at least 5 decode steps had both, one of them constrained
    chunks = [json.loads(p) for p in out["json"][:-1]]
    jsonschema.validate(json.loads("".join(c["choices"][0]["delta"].get("content", "") for c in chunks)), SCHEMA)
    n_prompt, tokens = hf_chat(hf_qwen3_vl, processor, image_chat(img), [img])
    assert out["plain"][0] == 200 and content(out["plain"][1]) == hf_text(processor, tokens)


def test_static_batching_worker_takes_the_same_fields(static_server, hf_haiku, processor):  # noqa: F811
    """`--batching static` (runtime/serve/serving.py): n choices of a schema-constrained request (each run alone:
    one grammar per Sampler) validate; greedy n = 2 with logprobs == HF's tokens, both choices the same entries."""
    import torch

    body = {"messages": [{"role": "user", "content": "Describe a person as JSON."}], "max_tokens": 120,
            "temperature": 1.0, "seed": 3, "n": 2, "structured_outputs": {"json": SCHEMA}}
    status, r = post(static_server, body)
    assert status == 200 and len(r["choices"]) == 2
    for i in range(2):
        jsonschema.validate(json.loads(content(r, i)), SCHEMA)
    status, r = post(static_server, greedy(HAIKU, n=2, logprobs=True))
    tokens, logits = hf_haiku
    assert [content(r, i) for i in range(2)] == [hf_text(processor, tokens)] * 2
    first = [e["logprob"] for e in r["choices"][0]["logprobs"]["content"]]
    ref = [float(torch.log_softmax(step, dim=-1)[t]) for t, step in zip(tokens, logits)]
    np.testing.assert_allclose(first, ref, atol=2 * FP32_ATOL)
    assert r["choices"][1]["logprobs"] == r["choices"][0]["logprobs"]


def test_openai_client_structured_logprobs_and_n(server, hf_haiku, processor):  # noqa: F811
    """The official `openai` client: a json_schema response_format (whole and streamed) parses and validates; n
    choices and logprobs parse into the client's types, greedy == HF."""
    from openai import OpenAI

    from test_server import NAME, url

    client = OpenAI(base_url=url(server, "/v1"), api_key="unused", max_retries=0, timeout=300)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=120, temperature=0,
                                       response_format=fmt)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=120, temperature=0.9,
                                                 seed=4, response_format=fmt, stream=True))
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), SCHEMA)
    r = client.chat.completions.create(model=NAME, messages=HAIKU, max_tokens=N_NEW, temperature=0, n=2,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    want = hf_text(processor, hf_haiku[0])
    assert [c.message.content for c in r.choices] == [want, want] and r.usage.completion_tokens == 2 * N_NEW
    assert [len(c.logprobs.content) for c in r.choices] == [N_NEW, N_NEW]
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in r.choices[0].logprobs.content)


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("extra,param,message", [
    ({"bad_words": ["x"]}, "bad_words", "bad_words: not supported by this server"),
    ({"echo": True}, "echo", "echo: not supported by this server"),
    ({"prompt_logprobs": 1}, "prompt_logprobs", "prompt_logprobs: not supported by this server"),
    ({"best_of": 2}, "best_of", "best_of: not supported by this server"),
    ({"use_beam_search": True}, "use_beam_search", "use_beam_search: not supported by this server"),
    ({"allowed_token_ids": [1]}, "allowed_token_ids", "allowed_token_ids: not supported by this server"),
    ({"guided_grammar": "root ::= 'a'"}, "guided_grammar", "guided_grammar: not supported by this server"),
    ({"structural_tag": "{}"}, "structural_tag", "structural_tag: not supported by this server"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "logit_bias: not supported by this server"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "frequency_penalty: not supported by this server"),
    ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens",
     "spaces_between_special_tokens: not supported by this server"),
    ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "structured_outputs.grammar",
     "structured_outputs.grammar: not supported by this server (json, regex, choice, json_object)"),
    ({"top_logprobs": 3}, "top_logprobs", "top_logprobs: needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs: must be in [0, 20], got 21"),
    ({"n": 0}, "n", "n: must be in [1, 16], got 0"),
    ({"min_p": 1.5}, "min_p", "min_p: must be in [0, 1], got 1.5"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "min_tokens: must be <= max_new_tokens (2), got 5"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids", "stop_token_ids: must be a list of integers"),
    ({"response_format": {"type": "xml"}}, "response_format",
     "response_format.type: 'xml' is not supported (text, json_object, json_schema)"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex",
     "guided_regex: only one structured output per request (also response_format)"),
    ({"guided_regex": "a" * 70000}, "guided_regex",
     "guided_regex: the regex grammar has 70000 characters: at most 65536 are allowed"),
    ({"guided_regex": "a+", "ignore_eos": True}, "ignore_eos",
     "ignore_eos: must be false with a structured output (the grammar ends the text), got True"),
])
def test_unsupported_or_bad_fields_get_a_400_naming_them(server, extra, param, message):  # noqa: F811
    status, r = post(server, {"messages": HI, "max_tokens": 4, **extra})
    assert status == 400 and r["error"]["param"] == param and r["error"]["message"] == message


def test_a_grammar_that_does_not_compile_is_a_400(server):  # noqa: F811
    status, r = post(server, {"messages": HI, "max_tokens": 4, "guided_regex": "[a-"})
    assert status == 400 and r["error"]["message"].startswith("invalid grammar: ")
    status, r = post(server, {"messages": HI, "max_tokens": 4, "structured_outputs": {"json": {"type": "bogus"}}})
    assert status == 400 and r["error"]["message"] == "invalid grammar: Invalid type: bogus"
