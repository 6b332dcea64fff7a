"""Structured outputs: the tokens a grammar allows next, per sequence, through llguidance (numpy; no torch).

A `Grammar` says what the output must be: `json_schema` (source: the schema, JSON text), `json_object` (any JSON
object), `regex`, or `choice` (source: a JSON list of strings, the output is exactly one of them). `Grammars`
(one per model: its tokenizer.json, the logits' vocabulary size, its EOS ids) compiles one into a
`TokenConstraint`, the object runtime/sampling.py's `Sampler` takes: `allowed()` -> bool [V] (the grammar's
tokens at this step; EOS only once the grammar accepts, and only EOS once it cannot go on) and `accept(token)`.

Why llguidance (`llguidance` on PyPI) rather than xgrammar: its wheel depends on nothing (xgrammar's Python
package requires torch, which the runtime must not import), its bitmask API is numpy (`llguidance.numpy`:
int32 [B, ceil(V / 32)], one bit per token, little-endian), it builds grammars with the GIL released, and each
`LLMatcher` is one sequence's state, which is what a slot of runtime/scheduler.py needs.

Cost: a grammar is compiled, and its first mask computed (the expensive part: lexer states built on first use;
measured 3-6 s for the regex `a{1000}{1000}` with llguidance's default limits), by `Grammars.constraint` on the
caller's thread (a request handler) with the GIL released, so the engine thread that steps every slot only pays
the per-step masks, which llguidance bounds by its step fuel (measured <= 10 ms on the cases tried). A grammar's
source is at most MAX_GRAMMAR_CHARS characters (a 3000-property schema, about 80 KB, took 4.5 s to compile).

JSON is compact: no whitespace between tokens (llguidance's `whitespace_flexible` off, as vLLM's
`disable_any_whitespace`). With flexible whitespace a weak model can emit blanks until max_tokens and never close
the object; compact JSON is also what OpenAI's structured outputs return.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np

from qwen_vl_trt.model.errors import UserError

KINDS = ("json_schema", "json_object", "regex", "choice")
MAX_GRAMMAR_CHARS = 64 * 1024
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(UserError):
    """A grammar that does not compile (llguidance's message)."""


@dataclass(frozen=True)
class Grammar:
    kind: str  # one of KINDS
    source: str  # json_schema: the schema as JSON text; regex: the pattern; choice: a JSON list of strings

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind {self.kind!r}: must be one of {', '.join(KINDS)}")
        if len(self.source) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the {self.kind} grammar has {len(self.source)} characters: at most "
                               f"{MAX_GRAMMAR_CHARS} are allowed")

    def llguidance(self) -> str:
        """The grammar in llguidance's own form (a JSON text LLMatcher takes)."""
        import llguidance

        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_OPTIONS)
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=_JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        choices = json.loads(self.source)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


class Grammars:
    """Compiles Grammars for one model. `tokenizer`: runtime/prompt.py Tokenizer (its tokenizer.json);
    `vocab_size`: the logits' width (may exceed the tokenizer's: those ids are never allowed); `eos_ids`: the
    tokens that end a sequence. The llguidance tokenizer is built on first use (about 1 s for Qwen's 151k tokens)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, int(vocab_size), [int(i) for i in eos_ids]
        self._ll = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        import llguidance

        with self._lock:
            if self._ll is None:
                self._ll = llguidance.LLTokenizer(self.tokenizer.tok.to_str(), n_vocab=self.vocab_size,
                                                  eos_token=self.eos_ids)
            return self._ll

    def constraint(self, grammar: Grammar) -> "TokenConstraint":
        """A fresh matcher for one sequence; GrammarError when the grammar does not compile."""
        import llguidance

        try:
            text = grammar.llguidance()
        except (ValueError, RuntimeError) as e:  # json_schema / regex / lark front-ends reject it
            raise GrammarError(_one_line(e)) from None
        matcher = llguidance.LLMatcher(self._ll_tokenizer(), text, log_level=0)
        if matcher.is_error():
            raise GrammarError(_one_line(matcher.get_error()))
        constraint = TokenConstraint(matcher, self.vocab_size, self.eos_ids)
        constraint.allowed()  # the first mask, here rather than on the engine's thread
        if constraint.error is not None:
            raise GrammarError(_one_line(constraint.error))
        return constraint


class TokenConstraint:
    """One sequence's grammar state (an llguidance LLMatcher) and its mask buffer int32 [1, ceil(V / 32)]."""

    def __init__(self, matcher, vocab_size: int, eos_ids):
        import llguidance.numpy as llnp

        self.matcher, self.vocab_size = matcher, vocab_size
        self.bitmask = llnp.allocate_token_bitmask(1, vocab_size)
        self.eos_only = np.zeros(vocab_size, bool)
        self.eos_only[[i for i in eos_ids if i < vocab_size]] = True
        self.error: str | None = None  # set when the matcher fails (a resource limit): the sequence then ends
        self.mask: np.ndarray | None = None  # bool [V] of the current state, until a token is accepted

    def copy(self) -> "TokenConstraint":
        """Another sequence's matcher in this one's state (the grammar is not compiled again)."""
        other = TokenConstraint(self.matcher.deep_copy(), self.vocab_size, np.flatnonzero(self.eos_only))
        other.error, other.mask = self.error, self.mask
        return other

    def allowed(self) -> np.ndarray:
        """bool [V]: the tokens the grammar allows next (do not modify it)."""
        import llguidance.numpy as llnp

        if self.mask is not None:
            return self.mask
        if self.error is None and self.matcher.is_error():
            self.error = self.matcher.get_error()
        if self.error is not None:
            return self.eos_only
        llnp.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        if self.matcher.is_error():  # a limit reached while computing it
            self.error = self.matcher.get_error()
            return self.eos_only
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[:self.vocab_size]
        self.mask = bits.astype(bool)
        return self.mask

    def accept(self, token: int) -> None:
        """Advance by the chosen token (one `allowed()` gave; after the grammar stopped, nothing changes)."""
        self.mask = None
        if self.error is None and not self.matcher.is_stopped():
            self.matcher.consume_token(int(token))

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()


def _one_line(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "invalid grammar: " + ("; ".join(lines[:3]) if lines else type(error).__name__)[:500]
