"""The encoder cache: vision features of recent images and videos, keyed by their content, so a request that shows
an image the engine has seen skips the vision encoder for it, whatever its text.

What makes two media items "the same" (docs/graphs.md, "Reusing work across requests"): the same preprocessed pixels
(`Media.pixel_values`, float32 [T, 3*2*P*P], after resizing and normalization: runtime/preprocess.py,
runtime/video.py) and the same grid (t, h, w). vision.onnx's other inputs are functions of the grids alone
(runtime/vision_inputs.py), and an item's rows depend on no other item (attention segments never cross items:
`cu_seqlens`), so equal keys give equal features. The key is `Media.digest` (runtime/pipeline.py): SHA-256 (16 bytes
kept) over the grid, the array's shape and dtype and its bytes. The same photo at two sizes has other pixels and
another grid: another key. Token ids play no part (every image's pad tokens are alike: the vLLM #8296 class of bug).

Held per item (host arrays in the export dtype): `features` [M, C] (one row per pad token, M = t*h*w / merge^2)
and, for Qwen3-VL, `deepstack` [Ld, M, C]. Bounded by `budget_bytes` (least recently used first out).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Item:
    features: np.ndarray  # [M, C]
    deepstack: np.ndarray | None  # [Ld, M, C]

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + (self.deepstack.nbytes if self.deepstack is not None else 0)


class _Media:
    """The `requests` argument of generate.encode_vision for a list of media items (it reads `.media`)."""

    def __init__(self, media: list):
        self.media = tuple(media)


class EncoderCache:
    """LRU of digest -> vision rows of one media item, within `budget_bytes`; counts hits and misses (items)."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.items: OrderedDict[bytes, _Item] = OrderedDict()
        self.used = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, digest: bytes) -> _Item | None:
        item = self.items.get(digest)
        if item is not None:
            self.items.move_to_end(digest)
        return item

    def put(self, digest: bytes, features: np.ndarray, deepstack: np.ndarray | None) -> None:
        item = _Item(np.ascontiguousarray(features), None if deepstack is None else np.ascontiguousarray(deepstack))
        if item.nbytes > self.budget or digest in self.items:
            return
        self.items[digest] = item
        self.used += item.nbytes
        while self.used > self.budget:
            _, old = self.items.popitem(last=False)
            self.used -= old.nbytes
            self.evictions += 1

    def stats(self) -> dict:
        return {"encoder_cache_hits": self.hits, "encoder_cache_misses": self.misses,
                "encoder_cache_evictions": self.evictions, "encoder_cache_items": len(self.items),
                "encoder_cache_bytes": self.used, "encoder_cache_budget_bytes": self.budget}


def encode_media(model, media: tuple, cache: EncoderCache | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Vision rows of `media` (runtime/pipeline.py Media, prompt order) as host arrays: (features [M, C], deepstack
    [Ld, M, C] or None), M = all their pad tokens. Cached items are taken from `cache`; the others go through the
    vision encoder together (runtime/generate.py encode_vision) and are cached. `cache` None: all encoded."""
    from .generate import encode_vision

    if cache is None or not media:
        return encode_vision(model, [_Media(media)], on_device=False)
    merge2 = model.spec.vision.spatial_merge_size ** 2
    found = [cache.get(m.digest) for m in media]
    missing = [m for m, item in zip(media, found) if item is None]
    cache.hits += len(media) - len(missing)
    cache.misses += len(missing)
    if missing:
        features, deepstack = encode_vision(model, [_Media(missing)], on_device=False)
        start, new = 0, iter(missing)
        for i, item in enumerate(found):
            if item is None:
                m = next(new)
                rows = slice(start, start + int(np.prod(m.grid_thw)) // merge2)
                found[i] = _Item(features[rows], None if deepstack is None else deepstack[:, rows])
                cache.put(m.digest, found[i].features, found[i].deepstack)
                start = rows.stop
    features = np.concatenate([item.features for item in found])
    if found[0].deepstack is None:
        return features, None
    return features, np.concatenate([item.deepstack for item in found], axis=1)
