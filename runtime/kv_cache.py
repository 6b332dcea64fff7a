"""The explicit KV cache of decoder.onnx: preallocated per-layer buffers and per-sequence lengths.

Layout (export/contracts.py `decoder_contract`): `past_key.{i}` / `past_value.{i}` are [B, Hkv, K, D] in the
export dtype, K = cache_len (fixed for a run). The decoder writes the new rows of sequence b at
`past_lengths[b] .. past_lengths[b] + S - 1` and returns the whole cache as `present_*.{i}`;
`update()` takes those outputs as the next step's inputs (a swap of references, no copy).

Buffers are numpy arrays, or device-resident values (onnxruntime OrtValues, TensorRT device buffers) when
the session allocates them: the cache only holds and swaps whatever `Session.empty_cache` gave it.
"""
from __future__ import annotations

import numpy as np


def numpy_dtype(dtype: str):
    """numpy dtype of an export dtype name; bfloat16 comes from ml_dtypes (an onnx dependency)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


class KVCache:
    """Per-layer caches [B, Hkv, K, D] plus `past_lengths` int64 [B] (tokens already cached per sequence)."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, cache_len: int, head_dim: int,
                 dtype: str = "float32", allocate=None):
        """`allocate(shape, dtype_name) -> buffer` (default: zeroed numpy arrays)."""
        self.num_layers, self.batch, self.cache_len = num_layers, batch, cache_len
        self.shape = (batch, num_kv_heads, cache_len, head_dim)  # [B, Hkv, K, D]
        self.dtype = dtype
        allocate = allocate or (lambda shape, dt: np.zeros(shape, numpy_dtype(dt)))
        self.buffers = {}
        for i in range(num_layers):
            self.buffers[f"past_key.{i}"] = allocate(self.shape, dtype)
            self.buffers[f"past_value.{i}"] = allocate(self.shape, dtype)
        self.past_lengths = np.zeros(batch, np.int64)

    def feeds(self) -> dict:
        """The decoder inputs `past_key.{i}`, `past_value.{i}`, `past_lengths` for the next step."""
        return {**self.buffers, "past_lengths": self.past_lengths.copy()}

    def fits(self, new_tokens: int) -> bool:
        return int(self.past_lengths.max(initial=0)) + new_tokens <= self.cache_len

    def update(self, outputs: dict, seq_lengths) -> None:
        """Take `present_*.{i}` from a decoder step as the new cache and advance `past_lengths` by `seq_lengths`
        (int or int [B]: the valid new tokens per sequence; right padding beyond them is overwritten later)."""
        for i in range(self.num_layers):
            self.buffers[f"past_key.{i}"] = outputs[f"present_key.{i}"]
            self.buffers[f"past_value.{i}"] = outputs[f"present_value.{i}"]
        self.past_lengths = self.past_lengths + np.asarray(seq_lengths, np.int64)
