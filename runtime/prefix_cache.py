"""The prefix cache: KV rows that earlier sequences left behind, keyed by what produced them, so a request whose
prompt starts the same way copies them into its slot and prefills only the rest (runtime/scheduler.py).

A row of the KV cache is a function of the tokens up to it, their embeddings and their MRoPE positions (the
decoder is causal). So the key of row i is what fixes those, one int64 row of `KEY_COLS` per token:

| column | text token | image / video pad token |
|---|---|---|
| 0 | token id | the pad token id |
| 1, 2 | 0, 0 | the item's `Media.digest` as two int64 (its pixels after preprocessing and its grid) |
| 3, 4, 5 | MRoPE position (t, h, w) | MRoPE position (t, h, w) |

Two prompts share rows [0, n) when their keys agree on [0, n): pad ids alone never match two images (vLLM #8296),
and the positions make the key exact even where they depend on more than the pixels (a Qwen2.5-VL video's
temporal positions scale with its frame rate). Positions are computed left to right (runtime/positions.py), so a
prefix's positions in a longer prompt are those it had alone; the rest of the prompt keeps its own positions and
rope delta (docs/graphs.md, "Reusing work across requests").

A reused prefix never ends inside a media item: `cut_points` allows a cut before a token only when that token and
the one before it are not pads of the same item. Nor does it take the prompt's last token: its logits give the
first new token, so at least one row is prefilled.

Entries are host arrays (`past_*` name -> [Hkv, P, D] in the export dtype) copied out of a slot
(runtime/backends/slots.py `read_rows`) when its prompt is written and again when the sequence ends (prompt +
generated rows: the next turn of a chat starts with them). An entry whose keys are a prefix of a newer one is
dropped. Bounded by `budget_bytes`, least recently used first out; counters in tokens, as vLLM's
prefix_cache_queries / prefix_cache_hits.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

KEY_COLS = 6


def prompt_keys(prep, image_token_id: int, video_token_id: int, merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys int64 [S, KEY_COLS], cut_points bool [S + 1]) of a PreparedRequest (runtime/pipeline.py).

    Pad tokens belong to the media items in order, `t*h*w / merge^2` each (the row order embed.onnx gathers them
    in: images, then the video). cut_points[p]: rows [0, p) may be reused without splitting an item."""
    ids = np.asarray(prep.input_ids, np.int64)
    keys = np.zeros((len(ids), KEY_COLS), np.int64)
    keys[:, 0] = ids
    keys[:, 3:] = np.asarray(prep.position_ids, np.int64).T
    cuts = np.ones(len(ids) + 1, bool)
    pads = np.flatnonzero((ids == image_token_id) | (ids == video_token_id))
    start = 0
    for m in prep.media:
        count = int(np.prod(m.grid_thw)) // merge_size ** 2
        own = pads[start:start + count]
        start += count
        if not len(own):
            continue
        keys[own, 1:3] = np.frombuffer(m.digest, np.int64)
        cuts[own[0] + 1:own[-1] + 1] = False  # no cut after the item's first pad, up to and at its last
    return keys, cuts


def generated_keys(token_ids, first_row: int, rope_delta: int) -> np.ndarray:
    """Keys [n, KEY_COLS] of generated tokens written at rows first_row, first_row + 1, ...: text, position
    row + rope_delta on the three axes (runtime/positions.py decode_position_ids)."""
    n = len(token_ids)
    keys = np.zeros((n, KEY_COLS), np.int64)
    keys[:, 0] = token_ids
    keys[:, 3:] = (np.arange(first_row, first_row + n, dtype=np.int64) + rope_delta)[:, None]
    return keys


@dataclass(eq=False)
class Entry:
    keys: np.ndarray  # int64 [P, KEY_COLS]
    rows: dict  # past_* name -> [Hkv, P, D] host array (export dtype)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + sum(r.nbytes for r in self.rows.values())


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two key arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero((a[:n] != b[:n]).any(axis=1))
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """LRU of Entry within `budget_bytes` (see the module docstring)."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.used = 0
        self._next_id = 0
        self.queries = self.hits = self.evictions = 0

    def lookup(self, keys: np.ndarray, cuts: np.ndarray) -> tuple[int, dict | None]:
        """(n, rows) for a prompt: its longest reusable prefix, n <= S - 1 and cuts[n], and the rows of that
        prefix (name -> [Hkv, n, D]); (0, None) on a miss. Counts the prompt's tokens as queried, n as hit."""
        self.queries += len(keys)
        allowed = np.flatnonzero(cuts[:len(keys)])  # cut points p <= S - 1
        best, best_id = 0, None
        for eid, entry in self.entries.items():
            common = _common(entry.keys, keys)
            n = int(allowed[np.searchsorted(allowed, common, side="right") - 1])
            if n > best:
                best, best_id = n, eid
        if best_id is None:
            return 0, None
        self.entries.move_to_end(best_id)
        self.hits += best
        return best, {name: rows[:, :best] for name, rows in self.entries[best_id].rows.items()}

    def holds(self, keys: np.ndarray) -> bool:
        """Whether some entry already starts with all of `keys`."""
        return any(_common(e.keys, keys) == len(keys) for e in self.entries.values())

    def insert(self, keys: np.ndarray, rows: dict) -> None:
        """Keep `rows` (name -> [Hkv, P, D], owned by the cache from now on) under `keys` [P, KEY_COLS]."""
        entry = Entry(keys, rows)
        if not len(keys) or entry.nbytes > self.budget:
            return
        for eid, old in list(self.entries.items()):
            common = _common(old.keys, keys)
            if common == len(keys) and len(old.keys) >= len(keys):  # already held (as or within a longer entry)
                self.entries.move_to_end(eid)
                return
            if common == len(old.keys):  # the new entry extends it
                self._drop(eid)
        self.entries[self._next_id] = entry
        self._next_id += 1
        self.used += entry.nbytes
        while self.used > self.budget:
            self._drop(next(iter(self.entries)))
            self.evictions += 1

    def _drop(self, eid: int) -> None:
        self.used -= self.entries.pop(eid).nbytes

    def stats(self) -> dict:
        return {"prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits,
                "prefix_cache_evictions": self.evictions, "prefix_cache_entries": len(self.entries),
                "prefix_cache_bytes": self.used, "prefix_cache_budget_bytes": self.budget}
