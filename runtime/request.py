"""One generation request, typed and validated once, for every front-end (`trt-run`, the OpenAI server, Triton,
`qwen-vl-request`) and the pipeline behind them.

`Request` holds what to generate from (prompt or chat, images, video, system) and how (max_new_tokens, `Sampling`,
stop strings, ignore_eos). Building one checks every value: an out-of-range value raises `FieldError` (a
UserError) naming the field, the value and the rule; a front-end may respell the field (`--top-p` for `trt-run`,
`top_p` for the server) but the rule is this module's. A value left None takes the checkpoint's default
(generation_config.json), resolved by `Sampling.config` and `Request.new_tokens`.

| field | rule | None means |
|---|---|---|
| `temperature` | finite, >= 0; below `GREEDY_BELOW` (1e-5) greedy, as vLLM's `_SAMPLING_EPS` (vllm/sampling_params.py) | generation_config.json (`do_sample` false: greedy) |
| `top_p` | in (0, 1] | generation_config.json, else 1 (off) |
| `top_k` | integer >= 0 (0 = off) | generation_config.json, else 0 |
| `repetition_penalty` | in [0.01, 100] (1 = off): HF divides positive logits by it and multiplies negative ones; vLLM's rule, > 0, let 1e-44 scale logits past float32 and always pick token 0 (issue 21) | generation_config.json, else 1 |
| `seed` | integer in [0, 2**63 - 1] (numpy's `default_rng` takes no negative seed) | a fresh random stream |
| `max_new_tokens` | integer >= 1 | generation_config.json's `max_new_tokens`, else 128 |
| `min_p` | in [0, 1] (0 = off) | 0 |
| `min_tokens` | integer >= 0, <= max_new_tokens | 0 |
| `stop_token_ids` | up to 64 integers >= 0 | () |
| `logprobs` | integer in [0, 20]: the chosen token's log-probability and that many alternatives (OpenAI's limit) | off |
| `n` | integer in [1, 16]: choices, each its own sequence (seeded: seed + index, as vLLM) | 1 |

Text options (the front-end that detokenizes applies them): `skip_special_tokens` (default True),
`include_stop_str_in_output` (the matched stop string, or the EOS / stop token's text, ends the output; default
False). `grammar`: a runtime/structured.py Grammar the output must match (structured outputs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from qwen_vl_trt.model.errors import UserError

from .sampling import SamplingConfig
from .structured import Grammar

DEFAULT_MEDIA_PROMPT = "Describe this image."
DEFAULT_MAX_NEW_TOKENS = 128
PENALTY_RANGE = (0.01, 100.0)  # repetition_penalty: logits scaled by at most 100 stay finite in float32
GREEDY_BELOW = 1e-5  # a temperature below this is greedy (vLLM's _SAMPLING_EPS)
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit (vLLM's default max_logprobs)
MAX_N = 16
MAX_STOP_TOKEN_IDS = 64


class FieldError(UserError):
    """A request field out of range: `field` (the request's name), `value`, `need` (the rule, in words)."""

    def __init__(self, field_name: str, value, need: str):
        super().__init__(f"{field_name} {value}: must be {need}")
        self.field, self.value, self.need = field_name, value, need


def _number(name: str, value, *, integer: bool = False):
    """`value` as int / float (bool is not a number), or FieldError."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise FieldError(name, value, "an integer" if integer else "a number")
    return value


# field -> (check, rule in words): the rules of the module table
_RULES = {
    "temperature": (lambda v: math.isfinite(v) and v >= 0, ">= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "repetition_penalty": (lambda v: PENALTY_RANGE[0] <= v <= PENALTY_RANGE[1], "in [0.01, 100] (1 = off)"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, "in [0, 2**63)"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "min_tokens": (lambda v: v >= 0, ">= 0"),
    "logprobs": (lambda v: 0 <= v <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]"),
    "n": (lambda v: 1 <= v <= MAX_N, f"in [1, {MAX_N}]"),
    "stop_token_ids": (lambda v: v >= 0, "a list of token ids >= 0"),
}
_INTEGERS = ("top_k", "seed", "max_new_tokens", "min_tokens", "logprobs", "n", "stop_token_ids")


def check_field(name: str, value) -> None:
    """Raise FieldError when `value` (not None) breaks the rule of field `name`."""
    if value is None:
        return
    value = _number(name, value, integer=name in _INTEGERS)
    check, need = _RULES[name]
    if not check(value):
        raise FieldError(name, value, need)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; None = the checkpoint's default (runtime/sampling.py has the semantics)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    stop_token_ids: tuple = ()
    logprobs: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "min_p", "min_tokens",
                     "logprobs"):
            check_field(name, getattr(self, name))
        if not isinstance(self.stop_token_ids, tuple) or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise FieldError("stop_token_ids", self.stop_token_ids, f"a list of up to {MAX_STOP_TOKEN_IDS} token ids")
        for token in self.stop_token_ids:
            check_field("stop_token_ids", token)

    def config(self, generation_config: dict) -> SamplingConfig:
        """The SamplingConfig to run: generation_config.json's defaults, then these values; a temperature below
        GREEDY_BELOW is greedy."""
        temperature = self.temperature
        if temperature is not None and temperature < GREEDY_BELOW:
            temperature = 0.0
        return SamplingConfig.from_generation_config(generation_config, temperature=temperature, top_p=self.top_p,
                                                     top_k=self.top_k, seed=self.seed,
                                                     repetition_penalty=self.repetition_penalty, min_p=self.min_p,
                                                     min_tokens=self.min_tokens, logprobs=self.logprobs,
                                                     stop_token_ids=self.stop_token_ids)

    @property
    def seeded_sampling(self) -> bool:
        """A seeded request that samples: it runs alone, so its seed alone fixes its text."""
        return self.seed is not None and (self.temperature is None or self.temperature >= GREEDY_BELOW)


@dataclass(frozen=True)
class Request:
    prompt: "str | object"  # one user text, or a whole chat (runtime/prompt.py Conversation: the server's requests)
    images: tuple = ()  # image file paths or encoded image bytes (a server / Triton request)
    video: str | None = None  # a video file or a directory of frames
    system: str | None = None
    max_new_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple = ()  # stop strings: the text ends before the first one found (the server)
    ignore_eos: bool = False  # generate exactly max_new_tokens
    n: int = 1  # choices (the server): each its own sequence
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    grammar: Grammar | None = None  # structured output (runtime/structured.py)

    def __post_init__(self):
        check_field("max_new_tokens", self.max_new_tokens)
        check_field("n", self.n)
        if not isinstance(self.sampling, Sampling):
            raise TypeError(f"Request.sampling must be a Sampling, got {type(self.sampling).__name__}")
        min_tokens = self.sampling.min_tokens
        if min_tokens is not None and self.max_new_tokens is not None and min_tokens > self.max_new_tokens:
            raise FieldError("min_tokens", min_tokens, f"<= max_new_tokens ({self.max_new_tokens})")
        if self.grammar is not None and self.ignore_eos:
            raise FieldError("ignore_eos", True, "false with a structured output (the grammar ends the text)")

    def choice_sampling(self, index: int) -> Sampling:
        """The Sampling of choice `index` of n: a seed becomes seed + index (vLLM's parallel sampling)."""
        seed = self.sampling.seed
        if seed is None or index == 0:
            return self.sampling
        return replace(self.sampling, seed=(seed + index) % (MAX_SEED + 1))

    def new_tokens(self, generation_config: dict) -> int:
        """max_new_tokens, else generation_config.json's, else DEFAULT_MAX_NEW_TOKENS."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return int(generation_config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)

    def batch_key(self, own_id=None) -> tuple:
        """Requests with equal keys may share one `generate` call (the sampler is per batch); a seeded sampled
        request gets `own_id` in its key and so runs alone, and so does one with a grammar (one constraint per
        Sampler)."""
        alone = self.sampling.seeded_sampling or self.grammar is not None
        return self.sampling, self.ignore_eos, own_id if alone else None


def prompt_or_default(prompt: str | None, has_media: bool, what: str) -> str:
    """The user text: `prompt`, or DEFAULT_MEDIA_PROMPT for media without one; `nothing to do: {what}` (how this
    front-end passes a prompt or media) when there are neither."""
    if prompt:
        return prompt
    if not has_media:
        raise UserError(f"nothing to do: {what}")
    return DEFAULT_MEDIA_PROMPT
