"""A chat request's `n` choices: one runtime/serve/serving.py Job per choice, and their events -> OpenAI objects.

`jobs(...)` makes the jobs of one request: each its own sequence (its own engine slot), choice i seeded with
seed + i (`Request.choice_sampling`, as vLLM's parallel sampling), all on one event queue and one cancel flag (a
client that goes cancels every choice), each with its own grammar matcher when the request has a structured
output. `Choices` folds their events (serving.py's event tuples) into the non-streaming response
(`response()`) or, one event at a time, into stream chunks (`chunks()`). Usage counts the prompt once and the
tokens of every choice, as vLLM does.
"""
from __future__ import annotations

import queue
import threading

from . import openai_protocol as api
from .serving import Job


def jobs(prepared, max_new: int, request, grammars, events: queue.Queue | None = None) -> list[Job]:
    """The Jobs of `request` (runtime/request.py) over its PreparedRequest, on `events` (a new queue.Queue when
    None; a front-end may pass its own Queue subclass) and one cancel flag; `grammars` (runtime/structured.py
    Grammars) compiles its grammar once (a GrammarError, a UserError, for a grammar that does not compile); each
    further choice gets a copy of the fresh matcher."""
    events, cancelled = events if events is not None else queue.Queue(), threading.Event()
    first = grammars.constraint(request.grammar) if request.grammar is not None else None
    out = []
    for index in range(request.n):
        constraint = first if index == 0 or first is None else first.copy()
        out.append(Job(prepared, max_new, request, events, cancelled, index, constraint))
    return out


class Choices:
    """The state of a request's choices while their events come in. `tokenizer` (runtime/prompt.py) spells the
    logprobs' tokens."""

    def __init__(self, n: int, tokenizer, cid: str, model: str):
        self.n, self.tokenizer, self.cid, self.model = n, tokenizer, cid, model
        self.texts = [[] for _ in range(n)]
        self.logprobs = [[] for _ in range(n)]
        self.wants_logprobs = False
        self.reasons: list = [None] * n
        self.tokens = [0] * n

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def usage(self, prompt_tokens: int) -> dict:
        return api.usage(prompt_tokens, sum(self.tokens))

    def add(self, event: tuple) -> None:
        """A "delta" or "done" event of one of the jobs."""
        index, entries = _index(event), _entries(event)
        if entries is not None:
            self.wants_logprobs = True
            self.logprobs[index] += entries
        if event[0] == "delta":
            self.texts[index].append(event[1])
        else:
            self.reasons[index], self.tokens[index] = event[1], event[2]

    def response(self, prompt_tokens: int) -> dict:
        """The `chat.completion` once `done`."""
        choices = [api.choice(i, "".join(self.texts[i]), self.reasons[i],
                              api.logprobs_content(self.tokenizer, self.logprobs[i]) if self.wants_logprobs else None)
                   for i in range(self.n)]
        return api.completion_of(self.cid, self.model, choices, self.usage(prompt_tokens))

    def first_chunks(self) -> list[dict]:
        """The role chunk of every choice."""
        return [api.chunk(self.cid, self.model, {"role": "assistant", "content": ""}, index=i) for i in range(self.n)]

    def chunks(self, event: tuple) -> list[dict]:
        """The stream chunks of one "delta" / "done" event (and records it)."""
        self.add(event)
        index, entries = _index(event), _entries(event)
        logprobs = api.logprobs_content(self.tokenizer, entries) if entries is not None else None
        if event[0] == "delta":
            return [api.chunk(self.cid, self.model, {"content": event[1]}, index=index, logprobs=logprobs)]
        if logprobs is not None and logprobs["content"]:  # tokens that gave no text of their own (EOS, held back)
            return [api.chunk(self.cid, self.model, {}, event[1], index=index, logprobs=logprobs)]
        return [api.chunk(self.cid, self.model, {}, event[1], index=index)]


def _index(event: tuple) -> int:
    """The choice of a "delta" (text, index, logprobs) or "done" (reason, tokens, index, logprobs) event; events of
    the older 2- / 3-tuple form are choice 0."""
    at = 2 if event[0] == "delta" else 3
    return event[at] if len(event) > at else 0


def _entries(event: tuple):
    at = 3 if event[0] == "delta" else 4
    return event[at] if len(event) > at else None
