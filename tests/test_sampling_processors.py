"""runtime/sampling.py's per-request processing and runtime/structured.py's token constraints, on synthetic logits.

References: HF's `MinPLogitsWarper` (after temperature / top-k / top-p, HF's order) and
`MinNewTokensLengthLogitsProcessor`; torch's `log_softmax` for the raw logprobs; the `jsonschema` validator, Python's
`re.fullmatch` and the choice list for the text a grammar lets through (the real Qwen tokenizer of the demo
checkpoint, 151936 logits as the demo model has). fp32 throughout: probabilities to rtol 1e-5 (float32 softmax
sums over 1000 values), log-probabilities to 1e-5 absolute (float64 sums here, float32 in torch).
"""
from __future__ import annotations

import json
import re
import shutil

import jsonschema
import numpy as np
import pytest
import torch

from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig, log_softmax, logits_to_probs, top_logprobs

VOCAB = 151936  # the demo model's logits (spec.text.vocab_size)
EOS = (151645, 151643)  # <|im_end|>, <|endoftext|>


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 0, 1.0, 0.1), (1.0, 50, 0.9, 0.05),
                                                          (1.3, 0, 1.0, 0.5), (0.5, 20, 1.0, 1.0)])
def test_min_p_matches_hf_warper_order(temperature, top_k, top_p, min_p):
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((3, 1000)) * 3).astype(np.float32)
    scores = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits))
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ref = torch.softmax(MinPLogitsWarper(min_p)(None, scores), dim=-1).numpy()
    ours = logits_to_probs(logits, SamplingConfig(temperature, top_k, top_p, min_p=min_p))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    assert np.array_equal(ours > 0, ref > 0)


def test_min_tokens_matches_hf_processor():
    """End tokens (EOS and stop_token_ids) are -inf for the first min_tokens choices, then free; the greedy choice
    at each step is the argmax of HF's processed scores."""
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    rng = np.random.default_rng(3)
    end = [5, 17, 400]  # EOS 5 and 17, stop token 400
    sampler = Sampler(SamplingConfig(temperature=0, min_tokens=3, stop_token_ids=(400,)), eos_ids=(5, 17))
    sampler.start([[1, 2, 3]], 1000)
    hf = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=3, min_new_tokens=3, eos_token_id=end)
    ids = torch.tensor([[1, 2, 3]])
    for step in range(5):
        logits = (rng.standard_normal((1, 1000))).astype(np.float32)
        logits[0, end[step % 3]] = 50.0  # an end token is the most likely at every step
        ref = hf(ids, torch.from_numpy(logits.copy())).numpy()
        token = sampler.sample(logits)
        assert token.tolist() == ref.argmax(-1).tolist()
        assert (token[0] in end) == (step >= 3)
        ids = torch.cat([ids, torch.from_numpy(token)[None]], dim=1)


def test_raw_logprobs_are_torch_log_softmax_of_the_logits():
    """vLLM's default logprobs_mode (raw_logprobs): the model's logits, before penalty, temperature and masks."""
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((2, 5000)) * 4).astype(np.float32)
    ref = torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()
    np.testing.assert_allclose(log_softmax(logits), ref, atol=1e-5)
    sampler = Sampler(SamplingConfig(temperature=0.8, seed=1, repetition_penalty=1.3, logprobs=5))
    sampler.start([[1, 2], [3]], 5000)
    tokens = sampler.sample(logits)
    for row, token, got in zip(ref, tokens, sampler.last_logprobs):
        assert got.token == token and got.logprob == pytest.approx(row[token], abs=1e-5)
        top = np.argsort(-row)[:5]
        assert [t for t, _ in got.top] == top.tolist()
        np.testing.assert_allclose([lp for _, lp in got.top], row[top], atol=1e-5)
    # ties at and across the k-th place: most likely first, then the lower id (Python's sort as the reference)
    tied = np.zeros((1, 300), np.float32)
    tied[0, [250, 7, 99, 3]] = 2.0
    tied[0, [120, 5]] = 1.0
    got = top_logprobs(log_softmax(tied), np.array([0]), 5)[0]
    ref_row = log_softmax(tied)[0]
    assert [t for t, _ in got.top] == sorted(range(300), key=lambda i: (-ref_row[i], i))[:5] == [3, 7, 99, 250, 5]


@pytest.fixture(scope="module")
def grammars(tmp_path_factory):
    from qwen_vl_trt.export.demo_checkpoint import tokenizer_dir
    from qwen_vl_trt.runtime.prompt import Tokenizer
    from qwen_vl_trt.runtime.structured import Grammars

    d = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir() / name, d / name)
    tok = Tokenizer(d)
    return Grammars(tok, VOCAB, EOS), tok


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"], "additionalProperties": False}


def run_constrained(grammars, grammar, seed: int, steps: int = 120, temperature: float = 1.0) -> tuple[list, bool]:
    """Sample from random logits under `grammar` until an EOS -> (tokens without the EOS, ended at EOS)."""
    g, _ = grammars
    sampler = Sampler(SamplingConfig(temperature=temperature, seed=seed), EOS, g.constraint(grammar))
    sampler.start([[1]], VOCAB)
    rng, out = np.random.default_rng(seed), []
    for _ in range(steps):
        token = int(sampler.sample((rng.standard_normal((1, VOCAB)) * 3).astype(np.float32))[0])
        if token in EOS:
            return out, True
        out.append(token)
    return out, False


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_constraint_gives_valid_json(grammars, seed):
    from qwen_vl_trt.runtime.structured import Grammar

    tokens, ended = run_constrained(grammars, Grammar("json_schema", json.dumps(SCHEMA)), seed)
    text = grammars[1].decode(tokens)
    assert ended, text
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("seed", [0, 1])
def test_regex_and_choice_constraints(grammars, seed):
    from qwen_vl_trt.runtime.structured import Grammar

    pattern = r"[0-9]{3}-[a-z]{2,5}( [A-Z]{1,4})?"
    tokens, ended = run_constrained(grammars, Grammar("regex", pattern), seed)
    assert ended and re.fullmatch(pattern, grammars[1].decode(tokens))
    options = ["yes", "no", "not sure, ask again"]
    tokens, ended = run_constrained(grammars, Grammar("choice", json.dumps(options)), seed)
    assert ended and grammars[1].decode(tokens) in options


def test_constraint_masks_only_its_row_and_greedy_takes_the_best_allowed(grammars):
    """Greedy under a choice grammar: the allowed token with the highest logit, whatever higher ones exist."""
    from qwen_vl_trt.runtime.structured import Grammar

    g, tok = grammars
    yes, no = tok.encode("yes").tolist(), tok.encode("no").tolist()
    assert len(yes) == 1 and len(no) == 1
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, 100] = 9.0  # not allowed
    logits[0, no[0]], logits[0, yes[0]] = 2.0, 1.0
    sampler = Sampler(SamplingConfig(temperature=0), EOS, g.constraint(Grammar("choice", '["yes", "no"]')))
    assert sampler.sample(logits).tolist() == no
    assert not sampler.device_greedy_ok  # a constrained request never takes the device greedy
    assert int(sampler.sample(logits)[0]) in EOS  # the choice is complete: only EOS is allowed


@pytest.mark.parametrize("grammar,message", [
    (("regex", "[a-"), "invalid grammar: at 1(8): invalid regex \"[a-\""),
    (("json_schema", '{"type": "bogus"}'), "invalid grammar: Invalid type: bogus"),
])
def test_bad_grammars_are_user_errors(grammars, grammar, message):
    from qwen_vl_trt.runtime.structured import Grammar, GrammarError

    with pytest.raises(GrammarError) as e:
        grammars[0].constraint(Grammar(*grammar))
    assert str(e.value).startswith(message)
