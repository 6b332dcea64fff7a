"""runtime/request.py: the one request type every front-end builds, and its validation (hand-checked values)."""
from __future__ import annotations

import math

import pytest

from qwen_vl_trt.model.errors import UserError
from qwen_vl_trt.runtime.request import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_MEDIA_PROMPT, FieldError, Request, Sampling,
                                         prompt_or_default)

MAX_SEED = 9223372036854775807  # 2**63 - 1, written out


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -1.0}, "temperature -1.0: must be >= 0 (0 = greedy)"),
    ({"temperature": math.inf}, "temperature inf: must be >= 0 (0 = greedy)"),
    ({"temperature": math.nan}, "temperature nan: must be >= 0 (0 = greedy)"),
    ({"top_p": 0.0}, "top_p 0.0: must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p 1.5: must be in (0, 1]"),
    ({"top_k": -1}, "top_k -1: must be >= 0 (0 = off)"),
    ({"top_k": 2.5}, "top_k 2.5: must be an integer"),
    ({"repetition_penalty": 0.0}, "repetition_penalty 0.0: must be in [0.01, 100] (1 = off)"),
    ({"repetition_penalty": math.nan}, "repetition_penalty nan: must be in [0.01, 100] (1 = off)"),
    ({"repetition_penalty": 1e-44}, "repetition_penalty 1e-44: must be in [0.01, 100] (1 = off)"),
    ({"repetition_penalty": 0.0099}, "repetition_penalty 0.0099: must be in [0.01, 100] (1 = off)"),
    ({"repetition_penalty": 100.5}, "repetition_penalty 100.5: must be in [0.01, 100] (1 = off)"),
    ({"seed": -1}, "seed -1: must be in [0, 2**63)"),
    ({"seed": MAX_SEED + 1}, f"seed {MAX_SEED + 1}: must be in [0, 2**63)"),
    ({"seed": True}, "seed True: must be an integer"),
    ({"temperature": "hot"}, "temperature hot: must be a number"),
])
def test_sampling_out_of_range_is_one_field_error(kwargs, message):
    with pytest.raises(FieldError) as e:
        Sampling(**kwargs)
    assert str(e.value) == message and isinstance(e.value, UserError)
    assert e.value.field == next(iter(kwargs))


def test_sampling_edges_are_accepted():
    Sampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)
    Sampling(seed=MAX_SEED, top_p=1e-9)


@pytest.mark.parametrize("max_new", [0, -3])
def test_max_new_tokens_at_least_one(max_new):
    with pytest.raises(FieldError, match=rf"^max_new_tokens {max_new}: must be >= 1$"):
        Request("hi", max_new_tokens=max_new)


def test_temperature_below_1e_5_is_greedy():
    """vLLM's rule (_SAMPLING_EPS = 1e-5): a temperature below it chooses the argmax."""
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8}
    assert Sampling(temperature=9.9e-6).config(gen).greedy
    assert not Sampling(temperature=1e-5).config(gen).greedy
    cfg = Sampling().config(gen)  # nothing set: generation_config.json's values
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty) == (0.7, 20, 0.8, 1.0)
    assert Sampling(top_k=5, seed=3).config({"do_sample": False}).greedy  # do_sample false: greedy by default


def test_new_tokens_default():
    assert Request("hi").new_tokens({}) == DEFAULT_MAX_NEW_TOKENS == 128
    assert Request("hi").new_tokens({"max_new_tokens": 7}) == 7
    assert Request("hi", max_new_tokens=3).new_tokens({"max_new_tokens": 7}) == 3


def test_batch_key_keeps_seeded_sampling_alone():
    greedy = [Request("a", sampling=Sampling(temperature=0.0, seed=1)), Request("b", sampling=Sampling(0.0, seed=1))]
    assert greedy[0].batch_key(1) == greedy[1].batch_key(2)  # greedy: the seed does not matter, they batch
    seeded = [Request("a", sampling=Sampling(0.7, seed=1)), Request("b", sampling=Sampling(0.7, seed=1))]
    assert seeded[0].batch_key(1) != seeded[1].batch_key(2)
    assert Request("a", ignore_eos=True).batch_key() != Request("a").batch_key()


def test_default_prompt():
    assert prompt_or_default(None, True, "x") == DEFAULT_MEDIA_PROMPT == "Describe this image."
    assert prompt_or_default("Why?", False, "x") == "Why?"
    with pytest.raises(UserError, match="^nothing to do: pass --prompt$"):
        prompt_or_default("", False, "pass --prompt")


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "error: --seed -1: must be in [0, 2**63)"),
    (["--top-k", "-2"], "error: --top-k -2: must be >= 0 (0 = off)"),
    (["--temperature", "nan"], "error: --temperature nan: must be >= 0 (0 = greedy)"),
])
def test_trt_run_names_the_flag(args, message, capsys):
    from qwen_vl_trt.runtime.serve.cli import main

    assert main(["--prompt", "x", "--model-dir", "/nonexistent", *args]) == 2
    assert capsys.readouterr().err.strip() == message


def test_triton_and_server_share_the_rules():
    """The server names the body field and keeps OpenAI's `got` form; the rule is the request's."""
    from qwen_vl_trt.runtime.serve.openai_protocol import ProtocolError, parse_chat_request

    body = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ProtocolError) as e:
        parse_chat_request({**body, "seed": -1})
    assert (str(e.value), e.value.param) == ("seed: must be in [0, 2**63), got -1", "seed")
    with pytest.raises(ProtocolError) as e:
        parse_chat_request({**body, "max_tokens": 0})
    assert (str(e.value), e.value.param) == ("max_tokens: must be >= 1, got 0", "max_tokens")
    req = parse_chat_request({**body, "temperature": 0, "stop": "x", "max_completion_tokens": 5}).request
    assert (req.sampling, req.stop, req.max_new_tokens) == (Sampling(temperature=0.0), ("x",), 5)
