"""Next-token choice from float32 logits [B, V], with Hugging Face `generate` semantics (numpy only).

Order as HF's processors and warpers (`transformers.generation.logits_process`): the repetition penalty
(`RepetitionPenaltyLogitsProcessor`: the logit of every token already in the sequence, prompt included, is
divided by the penalty, or multiplied when negative; applied in greedy mode too, as HF does whenever
generation_config.json sets it, e.g. Qwen2.5-VL's 1.05), then temperature scaling, then top-k
(`TopKLogitsWarper`: drop logits below the k-th largest, ties kept), then top-p (`TopPLogitsWarper`: sort
ascending, drop tokens whose cumulative probability is <= 1 - top_p, always keep the most likely), then
softmax and one multinomial draw per row from a seeded `numpy.random.Generator`.
Temperature 0 (or `do_sample: false` in generation_config.json) is greedy: argmax, first index on ties.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1 -> off
    min_p: float = 0.0  # 0 -> off
    min_tokens: int = 0  # end tokens suppressed until this many were chosen
    stop_token_ids: tuple = ()  # token ids that end a sequence besides EOS (the id is part of the output)
    logprobs: int | None = None  # None -> off; k -> the chosen token's log-probability and the k most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """Needs no per-sequence host state besides a repetition penalty: a device greedy may choose for it."""
        return self.min_tokens == 0 and self.logprobs is None

    @classmethod
    def from_generation_config(cls, gen: dict, **overrides) -> "SamplingConfig":
        """Defaults of generation_config.json (`do_sample` false -> greedy), then the non-None overrides."""
        base = {"temperature": float(gen.get("temperature", 1.0)) if gen.get("do_sample", False) else 0.0,
                "top_k": int(gen.get("top_k") or 0), "top_p": float(gen.get("top_p", 1.0) or 1.0),
                "repetition_penalty": float(gen.get("repetition_penalty") or 1.0)}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def logits_to_probs(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """float32 [B, V] logits -> float64 [B, V] probabilities after temperature, top-k and top-p."""
    scores = logits.astype(np.float32) / np.float32(cfg.temperature)
    if cfg.top_k > 0:
        k = min(cfg.top_k, scores.shape[-1])
        kth = np.partition(scores, -k, axis=-1)[:, -k, None]  # [B, 1]
        scores = np.where(scores < kth, -np.inf, scores)
    if cfg.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as HF
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        cum = np.cumsum(_softmax(sorted_scores), axis=-1)
        remove = cum <= (1 - cfg.top_p)
        remove[:, -1] = False  # min_tokens_to_keep = 1
        mask = np.zeros_like(remove)
        np.put_along_axis(mask, order, remove, axis=-1)
        scores = np.where(mask, -np.inf, scores)
    if cfg.min_p > 0.0:
        probs = _softmax(scores)
        scores = np.where(probs < np.float32(cfg.min_p) * probs.max(axis=-1, keepdims=True), -np.inf, scores)
    return _softmax(scores.astype(np.float64))


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """float32 [B, V] logits with those of the `seen` tokens (bool [B, V]) penalized, in float32 as HF."""
    p = np.float32(penalty)
    return np.where(seen, np.where(logits < 0, logits * p, logits / p), logits).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 [B, V] -> float32 [B, V] log-probabilities (computed in float64: the sum over a 150k vocabulary)."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


@dataclass(frozen=True)
class TokenLogprobs:
    """One chosen token's log-probability and the `k` most likely tokens' (ids, log-probabilities), most likely
    first (ties: lower id first)."""

    token: int
    logprob: float
    top: tuple  # ((token id, logprob), ...)


def top_logprobs(logprobs: np.ndarray, tokens: np.ndarray, k: int) -> list[TokenLogprobs]:
    """float32 [B, V] log-probabilities and the chosen int64 [B] -> one TokenLogprobs per row."""
    out = []
    for row, token in zip(logprobs, tokens):
        top = np.zeros(0, np.int64)
        if k > 0:  # the k-th largest value, every id at or above it (ties kept), then sorted: no full sort
            kth = np.partition(row, -min(k, row.size))[-min(k, row.size)]
            candidates = np.flatnonzero(row >= kth)
            top = candidates[np.lexsort((candidates, -row[candidates]))][:k]
        out.append(TokenLogprobs(int(token), float(row[token]), tuple((int(i), float(row[i])) for i in top)))
    return out


class Sampler:
    """`sample(logits [B, V]) -> int64 [B]`; holds the random generator so a seed fixes the whole run, and the
    tokens of each sequence so far when a repetition penalty is set (`start()` with the prompts).
    `eos_ids`: the EOS ids `min_tokens` holds back (with cfg.stop_token_ids). `constraint` (one sequence, B = 1):
    an object with `allowed() -> bool [V]` and `accept(token)` (runtime/structured.py). After each
    `sample`, `last_logprobs` holds a TokenLogprobs per row when cfg.logprobs is set."""

    def __init__(self, cfg: SamplingConfig, eos_ids=(), constraint=None):
        self.cfg, self.constraint = cfg, constraint
        self.rng = np.random.default_rng(cfg.seed)
        self.seen: np.ndarray | None = None  # bool [B, V]: tokens of each sequence (prompt + sampled)
        self.end_ids = np.array(sorted({*eos_ids, *cfg.stop_token_ids}), np.int64)
        self.chosen = 0  # tokens chosen per sequence so far
        self.last_logprobs: list[TokenLogprobs] | None = None

    @property
    def device_greedy_ok(self) -> bool:
        """A device greedy (runtime/backends/device_sampling.py) may choose instead of `sample`."""
        return self.cfg.greedy and self.cfg.plain and self.constraint is None

    def start(self, prompts, vocab_size: int) -> None:
        """Begin a batch: `prompts` holds each sequence's prompt token ids (unpadded)."""
        self.seen, self.chosen = None, 0
        if self.cfg.repetition_penalty != 1.0:
            self.seen = np.zeros((len(prompts), vocab_size), bool)
            for b, ids in enumerate(prompts):
                self.seen[b, np.asarray(ids, np.int64)] = True

    def sample(self, logits: np.ndarray) -> np.ndarray:
        raw = logits
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.cfg.repetition_penalty)
        logits = self._restrict(logits)
        tokens = self._choose(logits)
        if self.cfg.logprobs is not None:
            self.last_logprobs = top_logprobs(log_softmax(raw), tokens, self.cfg.logprobs)
        if self.seen is not None:
            self.seen[np.arange(len(tokens)), tokens] = True
        if self.constraint is not None:
            self.constraint.accept(int(tokens[0]))
        self.chosen += 1
        return tokens

    def _restrict(self, logits: np.ndarray) -> np.ndarray:
        """min_tokens' end-token suppression, then the constraint's mask (-inf outside it). Where the two leave
        nothing (the grammar has ended but min_tokens is not reached), the grammar wins: its end tokens stay."""
        suppress = self.chosen < self.cfg.min_tokens and self.end_ids.size
        allowed = self.constraint.allowed() if self.constraint is not None else None
        if not suppress and allowed is None:
            return logits
        logits = np.array(logits, np.float32)  # a copy: the IO's logits buffer is not ours to change
        if allowed is not None:
            if len(logits) != 1:
                raise ValueError("a constrained Sampler chooses for one sequence")
            logits[:, ~allowed[:logits.shape[-1]]] = -np.inf
        if suppress:
            kept = logits[:, self.end_ids].copy()
            logits[:, self.end_ids] = -np.inf
            empty = ~np.isfinite(logits).any(axis=-1)
            logits[np.flatnonzero(empty)[:, None], self.end_ids[None]] = kept[empty]
        return logits

    def _choose(self, logits: np.ndarray) -> np.ndarray:
        if self.cfg.greedy:
            return logits.argmax(axis=-1).astype(np.int64)
        probs = logits_to_probs(logits, self.cfg)
        # inverse-CDF draw: one uniform per row
        u = self.rng.random((probs.shape[0], 1))
        cdf = np.cumsum(probs, axis=-1)
        idx = (cdf < u * cdf[:, -1:]).sum(axis=-1)
        return np.minimum(idx, probs.shape[-1] - 1).astype(np.int64)
