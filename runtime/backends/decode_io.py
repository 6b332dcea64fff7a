"""The decoder's inputs and outputs over one generation: who owns the KV cache and the step's buffers, and
where the next token is chosen. `generate.py` calls `io.prefill(...)` once and `io.decode(...)` per token;
both return the chosen tokens int64 [B] on the host -- the only tensor that must cross to the host per step.

| class | sessions | per decode step |
|---|---|---|
| `HostIO` | any `Session.run` (ONNX Runtime with numpy feeds) | feeds from preallocated host arrays; the returned `present_*` become the cache by reference; logits to the host, `Sampler` |
| `OrtBoundIO` (`ort_io.py`) | `OrtSession` with I/O binding (the default; always on the CUDA EP) | nothing is bound per step: decoder IOBindings made once; with decoder.ort.onnx one KV set, written in place (GroupQueryAttention with present bound to past), with decoder.onnx two, one read and the other written (ping-pong, fixed addresses); the embed binding writes straight into the decoder's input buffers; `input_ids`, `position_ids`, `past_lengths` are written in place; greedy on the device (`device_sampling.DeviceGreedy`); on the CUDA EP the decoder run replays a CUDA graph |
| `TrtBoundIO` (`trt_io.py`) | `TrtSession` | the same with TensorRT: static buffers, KV cache in place, CUDA graph per (batch, cache_len) |

The decoder session makes its IO (`Session.decode_io`, runtime/backends/base.py). Static objects are reused:
`decode_io(model, batch, cache_len)` keeps the last IO of the model and hands it out again (cache emptied) for the
same (batch, cache_len), so repeated requests of one shape allocate nothing
and replay the CUDA graphs captured for them. A new shape gets new buffers and new graph ids: a graph id is never
run with buffers other than the ones it was captured with.
"""
from __future__ import annotations

import numpy as np

from .kv_cache import KVCache, numpy_dtype


def decode_io(model, batch: int, cache_len: int):
    """The IO object for a generation of `batch` sequences in a cache of `cache_len` rows (ready to prefill)."""
    key = (batch, cache_len)
    io = model.static.get(key)
    if io is None:
        model.static.clear()  # drop the previous shape's buffers before allocating new ones
        io = model.static[key] = model.sessions["decoder"].decode_io(model, batch, cache_len)
    io.reset()
    return io


def empty_vision(spec, dtype: str) -> dict:
    """Zero-row vision feeds of embed.onnx (a decode step has no visual tokens)."""
    c, dt = spec.text.hidden_size, numpy_dtype(dtype)
    empty = {"vision_features": np.zeros((0, c), dt)}
    if spec.num_deepstack:
        empty["deepstack_features"] = np.zeros((spec.num_deepstack, 0, c), dt)
    return empty


def _host(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


class HostIO:
    """Any Session: each step's feeds built from preallocated host arrays, outputs as the session returns them."""

    def __init__(self, model, batch: int, cache_len: int):
        self.model, self.batch, self.cache_len = model, batch, cache_len
        self.reset()
        self.input_ids = np.zeros((batch, 1), np.int64)  # [B, 1]
        self.logits_index = np.zeros(batch, np.int64)  # [B]: decode computes one row
        self.empty = empty_vision(model.spec, model.manifest.dtype)

    def prefill(self, embeds: dict, position_ids: np.ndarray, lengths: np.ndarray, sampler) -> np.ndarray:
        return sampler.sample(self._step(embeds, position_ids, lengths - 1, lengths))

    def decode(self, tokens: np.ndarray, position_ids: np.ndarray, sampler) -> np.ndarray:
        self.input_ids[:, 0] = tokens
        embeds = self.model.sessions["embed"].run({"input_ids": self.input_ids, **self.empty})
        return sampler.sample(self._step(embeds, position_ids, self.logits_index, 1))

    def _step(self, embeds: dict, position_ids, logits_index, new_tokens) -> np.ndarray:
        feeds = {**embeds, "position_ids": position_ids, "logits_index": logits_index, **self.cache.feeds()}
        out = self.model.sessions["decoder"].run(feeds)
        self.cache.update(out, new_tokens)
        return _host(out["logits"])  # float32 [B, V]

    def greedy_on_device(self, sampler) -> None:
        """None: numpy feeds choose on the host."""
        return None

    def reset(self) -> None:
        """A new generation: a new zeroed cache (the steps replace its buffers by the session's outputs)."""
        t = self.model.spec.text
        self.cache = KVCache(t.num_hidden_layers, self.batch, t.num_key_value_heads, self.cache_len, t.head_dim,
                             self.model.manifest.dtype, allocate=self.model.sessions["decoder"].allocate)
