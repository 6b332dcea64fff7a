"""The decoder's inputs and outputs over one generation: who owns the KV cache and the step's buffers, and
where the next token is chosen. `generate.py` calls `io.prefill(...)` once and `io.decode(...)` per token;
both return the chosen tokens int64 [B] on the host -- the only tensor that must cross to the host per step.

| class | sessions | per decode step |
|---|---|---|
| `HostIO` | any `Session.run` (ONNX Runtime with numpy feeds) | feeds from preallocated host arrays; the returned `present_*` become the cache by reference; logits to the host, `Sampler` |
| `OrtBoundIO` | `OrtSession` with I/O binding (the default; always on the CUDA EP) | nothing is bound per step: decoder IOBindings made once; with decoder.ort.onnx one KV set, written in place (GroupQueryAttention with present bound to past), with decoder.onnx two, one read and the other written (ping-pong, fixed addresses); the embed binding writes straight into the decoder's input buffers; `input_ids`, `position_ids`, `past_lengths` are written in place; greedy on the device (`device_sampling.DeviceGreedy`); on the CUDA EP the decoder run replays a CUDA graph |
| `TrtBoundIO` (`trt_session.py`) | `TrtSession` | the same with TensorRT: static buffers, KV cache in place, CUDA graph per (batch, cache_len) |

Static objects are reused: `decode_io(model, batch, cache_len)` keeps the last bound IO of the model and hands
it out again (cache zeroed) for the same (batch, cache_len), so repeated requests of one shape allocate nothing
and replay the CUDA graphs captured for them. A new shape gets new buffers and new graph ids: a graph id is never
run with buffers other than the ones it was captured with.
"""
from __future__ import annotations

import numpy as np

from .device_sampling import DeviceGreedy
from .kv_cache import KVCache, numpy_dtype


def decode_io(model, batch: int, cache_len: int):
    """The IO object for a generation of `batch` sequences in a cache of `cache_len` rows (ready to prefill)."""
    bound = getattr(model.sessions["decoder"], "bound_io", None)
    if bound is None:
        return HostIO(model, batch, cache_len)
    key = (batch, cache_len)
    io = model.static.get(key)
    if io is None:
        model.static.clear()  # drop the previous shape's buffers before allocating new ones
        io = model.static[key] = bound(model, batch, cache_len)
    io.reset()
    return io


def _empty_vision(spec, dtype: str) -> dict:
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
        t = model.spec.text
        self.model = model
        self.cache = KVCache(t.num_hidden_layers, batch, t.num_key_value_heads, cache_len, t.head_dim,
                             model.manifest.dtype, allocate=model.sessions["decoder"].allocate)
        self.input_ids = np.zeros((batch, 1), np.int64)  # [B, 1]
        self.logits_index = np.zeros(batch, np.int64)  # [B]: decode computes one row
        self.empty = _empty_vision(model.spec, model.manifest.dtype)

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

    def reset(self) -> None:
        self.cache.reset()


class OrtBoundIO:
    """ONNX Runtime with every decode-step input and output bound once (see the module table)."""

    def __init__(self, model, batch: int, cache_len: int):
        spec, dtype = model.spec, model.manifest.dtype
        t, c = spec.text, spec.text.hidden_size
        self.model, self.dec, self.emb = model, model.sessions["decoder"], model.sessions["embed"]
        new = self.dec.allocate
        # decoder.ort.onnx writes the cache in place when present is bound to past: one set; else ping-pong
        self.cache = KVCache(t.num_hidden_layers, batch, t.num_key_value_heads, cache_len, t.head_dim, dtype,
                             allocate=new, sets=1 if getattr(self.dec, "kv_in_place", False) else 2)
        self.input_ids = new((batch, 1), "int64")  # [B, 1]
        self.small = {"position_ids": new((3, batch, 1), "int64"), "past_lengths": new((batch,), "int64"),
                      "logits_index": new((batch,), "int64")}  # logits_index stays 0: decode computes one row
        self.logits = new((batch, t.vocab_size), "float32")  # [B, V]
        self.embeds = {"inputs_embeds": new((batch, 1, c), dtype)}  # [B, 1, C]
        if spec.num_deepstack:
            self.embeds["deepstack_embeds"] = new((spec.num_deepstack, batch, 1, c), dtype)  # [Ld, B, 1, C]
        empty = {k: self.emb.allocate(v.shape, dtype) for k, v in _empty_vision(spec, dtype).items()}
        self.embed_binding = self.emb.bind({"input_ids": self.input_ids, **empty}, self.embeds)
        sets = range(len(self.cache.sets))
        self.graph_ids = [self.dec.new_graph_id() for _ in sets]
        self.run_options = [self.dec.run_options(g) for g in self.graph_ids]
        self.prefill_options = self.dec.run_options(None)  # a prefill run is never captured
        self.bindings = [self._bind_decoder(p) for p in sets]  # bindings[p] reads KV set p, writes the next set
        self.cache.current = 0
        # greedy on the device where logits would otherwise cross to the host; on the CPU EP numpy's argmax reads
        # the bound logits in place (faster than ORT's CPU ArgMax); tests switch it on to check it there
        self.device_greedy = self.dec.device != "cpu"
        self.greedy: DeviceGreedy | None = None  # the one this generation uses
        self._greedy_by_penalty: dict[float, DeviceGreedy] = {}

    def _bind_decoder(self, current: int):
        self.cache.current = current
        inputs = {**self.embeds, **self.small, **self.cache.buffers}
        return self.dec.bind(inputs, {"logits": self.logits, **self.cache.targets()})

    def reset(self) -> None:
        """A new generation: empty cache (zeroed, same addresses)."""
        self.cache.reset()
        for buf in self.cache.sets[0].values():
            self.dec.zero(buf)

    def prefill(self, embeds: dict, position_ids: np.ndarray, lengths: np.ndarray, sampler) -> np.ndarray:
        """Prompt step: its shapes vary, so it gets a one-off binding (inputs copied in), never a graph."""
        inputs = {**embeds, "position_ids": position_ids, "past_lengths": np.zeros(len(lengths), np.int64),
                  "logits_index": lengths - 1, **self.cache.buffers}
        binding = self.dec.bind(inputs, {"logits": self.logits, **self.cache.targets()})
        self.dec.sess.run_with_iobinding(binding, self.prefill_options)
        self.cache.advance(lengths)
        self.greedy = self._greedy(sampler) if sampler.cfg.greedy and self.device_greedy else None
        if self.greedy is not None:
            self.greedy.start(sampler.seen)
        return self._choose(sampler)

    def decode(self, tokens: np.ndarray, position_ids: np.ndarray, sampler) -> np.ndarray:
        """One token: three small in-place writes, the embed run, the decoder run (a graph replay on CUDA)."""
        self.input_ids.update_inplace(np.ascontiguousarray(tokens, np.int64).reshape(-1, 1))
        self.small["position_ids"].update_inplace(np.ascontiguousarray(position_ids, np.int64))
        self.small["past_lengths"].update_inplace(self.cache.past_lengths)
        self.emb.sess.run_with_iobinding(self.embed_binding)
        p = self.cache.current
        self.dec.sess.run_with_iobinding(self.bindings[p], self.run_options[p])
        self.cache.advance(1)
        return self._choose(sampler)

    def _greedy(self, sampler) -> DeviceGreedy:
        penalty = float(sampler.cfg.repetition_penalty)
        if penalty not in self._greedy_by_penalty:
            self._greedy_by_penalty[penalty] = DeviceGreedy(
                self.dec.ort, self.dec.sess.get_providers(), self.logits, self.cache.batch,
                self.model.spec.text.vocab_size, penalty, self.dec.device)
        return self._greedy_by_penalty[penalty]

    def _choose(self, sampler) -> np.ndarray:
        if self.greedy is not None:
            return self.greedy.sample()
        return sampler.sample(self.logits.numpy())  # on the host: the CPU EP, or temperature / top-k / top-p
