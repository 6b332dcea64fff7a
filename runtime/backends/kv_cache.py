"""The explicit KV cache of decoder.onnx: preallocated per-layer buffers and per-sequence lengths.

Layout (model/contracts.py `decoder_contract`): `past_key.{i}` / `past_value.{i}` are [B, Hkv, K, D] in the
export dtype, K = cache_len (fixed for a run). The decoder writes the new rows of sequence b at
`past_lengths[b] .. past_lengths[b] + S - 1` and returns the whole cache as `present_*.{i}`.

Buffers are numpy arrays, or device-resident values (onnxruntime OrtValues, TensorRT device buffers) when
the session allocates them: the cache only holds and swaps whatever `Session.allocate` gave it. Three ways
a step's `present_*` become the next step's `past_*`:
- `update(outputs, n)`: take the outputs the session returned as the new cache (a swap of references);
- `advance(n)` with `sets=2`: the step wrote its `present_*` into the other preallocated set (bound outputs,
  ONNX Runtime's reference body writes a full copy), so the two sets swap roles -- every address stays fixed;
- `advance(n)` with `sets=1`: the step wrote in place (TensorRT's KVCacheAttention plugin aliases present to past).
"""
from __future__ import annotations

import numpy as np


def numpy_dtype(dtype: str):
    """numpy dtype of an export dtype name; bfloat16 comes from ml_dtypes (an onnx dependency)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def cache_names(num_layers: int, kind: str = "past") -> list[str]:
    """`past_key.0, past_value.0, past_key.1, ...` (kind "past"), or the `present_*` names: allocation order."""
    return [f"{kind}_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]


class KVCache:
    """Per-layer caches [B, Hkv, K, D] plus `past_lengths` int64 [B] (tokens already cached per sequence)."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, cache_len: int, head_dim: int,
                 dtype: str = "float32", allocate=None, sets: int = 1):
        """`allocate(shape, dtype_name) -> buffer` (default: zeroed numpy arrays); `sets` 2 for ping-pong buffers."""
        self.num_layers, self.batch, self.cache_len = num_layers, batch, cache_len
        self.shape = (batch, num_kv_heads, cache_len, head_dim)  # [B, Hkv, K, D]
        self.dtype = dtype
        allocate = allocate or (lambda shape, dt: np.zeros(shape, numpy_dtype(dt)))
        self.sets = [{name: allocate(self.shape, dtype) for name in self.names("past")} for _ in range(sets)]
        self.current = 0  # index of the set that holds the cache (the next step's past_*)
        self.past_lengths = np.zeros(batch, np.int64)

    def names(self, kind: str) -> list[str]:
        return cache_names(self.num_layers, kind)

    @property
    def buffers(self) -> dict:
        """past_* name -> buffer of the set that holds the cache."""
        return self.sets[self.current]

    def targets(self) -> dict:
        """present_* name -> buffer the next step writes: the other set, or the same one (in place) when single."""
        nxt = self.sets[(self.current + 1) % len(self.sets)]
        return {f"present{name[4:]}": buf for name, buf in nxt.items()}

    def feeds(self) -> dict:
        """The decoder inputs `past_key.{i}`, `past_value.{i}`, `past_lengths` for the next step."""
        return {**self.buffers, "past_lengths": self.past_lengths.copy()}

    def fits(self, new_tokens: int) -> bool:
        return int(self.past_lengths.max(initial=0)) + new_tokens <= self.cache_len

    def update(self, outputs: dict, seq_lengths) -> None:
        """Take `present_*.{i}` from a decoder step as the new cache and advance `past_lengths` by `seq_lengths`
        (int or int [B]: the valid new tokens per sequence; right padding beyond them is overwritten later)."""
        self.sets[self.current] = {name: outputs[f"present{name[4:]}"] for name in self.names("past")}
        self.past_lengths += np.asarray(seq_lengths, np.int64)

    def advance(self, seq_lengths) -> None:
        """The step wrote `targets()`: they now hold the cache. Advance `past_lengths` as `update` does."""
        self.current = (self.current + 1) % len(self.sets)
        self.past_lengths += np.asarray(seq_lengths, np.int64)

    def reset(self) -> None:
        """Empty the cache for a new generation (the buffers are kept; rows beyond past_lengths are never read
        unmasked, and the session zeroes them when it can: see Session.zero)."""
        self.current = 0
        self.past_lengths[:] = 0
