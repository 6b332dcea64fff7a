"""Inputs of one decoder prefill step for tests that compare two sessions of the same decoder graph."""
from __future__ import annotations

import numpy as np


def prefill_feeds(spec, rng, seq: int = 9, cache_len: int = 64) -> dict:
    """decoder.ort.onnx's inputs for one `seq`-token prefill at batch 1: seeded N(0, 1) embeddings (and DeepStack
    features where the model has them) at positions 0.., an empty cache of `cache_len` rows, logits of the last token."""
    t = spec.text
    feeds = {"inputs_embeds": rng.standard_normal((1, seq, t.hidden_size)).astype(np.float32),
             "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (3, 1, seq)).copy(),
             "past_lengths": np.zeros(1, np.int64), "logits_index": np.array([seq - 1], np.int64)}
    if spec.num_deepstack:
        feeds["deepstack_embeds"] = rng.standard_normal((spec.num_deepstack, 1, seq, t.hidden_size)).astype(np.float32)
    for i in range(t.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{i}"] = np.zeros((1, t.num_key_value_heads, cache_len, t.head_dim), np.float32)
    return feeds
