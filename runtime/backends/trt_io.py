"""The decode IO of TensorRT engines (a DecodeIO of runtime/backends/base.py; runtime/backends/trt.py opens the
sessions). Not executed on a GPU yet: tests/test_trt_session.py runs it against a fake TensorRT and CUDA.

`TrtBoundIO`: the decode IO of runtime/backends/decode_io.py: KV views of the static buffers (one set in place, else
  two that ping-pong), embed writing straight into the decoder's input buffers, token / position / past-length
  staged in pinned host memory and copied in, the two engines replayed as CUDA graphs, greedy on the device
  through onnxruntime-gpu when present (else the logits are copied to pinned host memory).
"""
from __future__ import annotations

import numpy as np

from .device_sampling import greedy_on_cuda_logits
from .cuda import DeviceView, PinnedArray
from .kv_cache import KVCache, cache_names


class TrtBoundIO:
    """Decode IO over two TrtSessions (embed, decoder); see runtime/backends/base.py for the protocol."""

    def __init__(self, model, batch: int, cache_len: int, greedy_factory=None):
        spec, dtype = model.spec, model.manifest.dtype
        t, c = spec.text, spec.text.hidden_size
        self.model, self.dec, self.emb = model, model.sessions["decoder"], model.sessions["embed"]
        dec, emb, cudart = self.dec, self.emb, self.dec.cudart
        shape = (batch, t.num_key_value_heads, cache_len, t.head_dim)
        sets = 1 if dec.in_place else 2
        views = iter([dec.view(("past" if s == 0 else "present") + n[4:], shape)
                      for s in range(sets) for n in cache_names(t.num_hidden_layers)])  # KVCache's order
        self.cache = KVCache(t.num_hidden_layers, batch, t.num_key_value_heads, cache_len, t.head_dim, dtype,
                             allocate=lambda *_: next(views), sets=sets)
        self.staged = {"input_ids": PinnedArray((batch, 1), "int64", cudart),
                       "position_ids": PinnedArray((3, batch, 1), "int64", cudart),
                       "past_lengths": PinnedArray((batch,), "int64", cudart)}
        self.ids = emb.view("input_ids", (batch, 1))
        self.small = {"position_ids": dec.view("position_ids", (3, batch, 1)),
                      "past_lengths": dec.view("past_lengths", (batch,)),
                      "logits_index": dec.view("logits_index", (batch,))}
        self.embeds = {"inputs_embeds": dec.view("inputs_embeds", (batch, 1, c))}
        self.empty = {"vision_features": emb.view("vision_features", (0, c))}
        if spec.num_deepstack:
            self.embeds["deepstack_embeds"] = dec.view("deepstack_embeds", (spec.num_deepstack, batch, 1, c))
            self.empty["deepstack_features"] = emb.view("deepstack_features", (spec.num_deepstack, 0, c))
        self.logits = dec.view("logits", (batch, t.vocab_size))
        self.host_logits = PinnedArray((batch, t.vocab_size), "float32", cudart)
        factory = greedy_factory or _ort_device_greedy
        self._factory, self._greedy, self.greedy = factory, {}, None

    def reset(self) -> None:
        self.cache.reset()
        for view in self.cache.sets[0].values():
            self.dec.zero(view)
        self.dec.zero(self.small["logits_index"])  # decode computes row 0

    def prefill(self, embeds: dict, position_ids: np.ndarray, lengths: np.ndarray, sampler) -> np.ndarray:
        feeds = {**embeds, "position_ids": position_ids, "past_lengths": np.zeros(len(lengths), np.int64),
                 "logits_index": lengths - 1, **self.cache.buffers}
        self.dec.bind(feeds, {"logits": self.logits, **self.cache.targets()})
        self.dec.execute()
        self.dec.zero(self.small["logits_index"])  # the prefill wrote lengths - 1 there
        self.cache.advance(lengths)
        self.greedy = self._greedy_for(sampler) if sampler.device_greedy_ok else None
        if self.greedy is not None:
            self.dec.sync()
            self.greedy.start(sampler.seen)
        return self._choose(sampler)

    def decode(self, tokens: np.ndarray, position_ids: np.ndarray, sampler) -> np.ndarray:
        st = self.staged
        st["input_ids"].array[:, 0] = tokens
        st["position_ids"].array[...] = position_ids
        st["past_lengths"].array[...] = self.cache.past_lengths
        for name, dst in (("input_ids", self.ids), ("position_ids", self.small["position_ids"]),
                          ("past_lengths", self.small["past_lengths"])):
            self.dec.copy_in(dst, st[name].ptr, dst.nbytes)
        self.emb.bind({"input_ids": self.ids, **self.empty}, self.embeds)
        self.emb.execute(graph=True)
        self.dec.bind({**self.embeds, **self.small, **self.cache.buffers},
                      {"logits": self.logits, **self.cache.targets()})
        self.dec.execute(graph=True)
        self.cache.advance(1)
        return self._choose(sampler)

    def greedy_on_device(self, sampler):
        """Greedy reading TensorRT's logits on the GPU (onnxruntime-gpu), or None without it."""
        return self._greedy_for(sampler)

    def _greedy_for(self, sampler):
        penalty = float(sampler.cfg.repetition_penalty)
        if penalty not in self._greedy:
            self._greedy[penalty] = self._factory(self.logits, penalty)
        return self._greedy[penalty]

    def _choose(self, sampler) -> np.ndarray:
        if self.greedy is not None:
            self.dec.sync()
            return self.greedy.sample()  # reads the logits on the device; only the token ids come back
        self.dec.copy_out(self.host_logits.ptr, self.logits, self.logits.nbytes)
        self.dec.sync()
        return sampler.sample(self.host_logits.array)


def _ort_device_greedy(logits: DeviceView, penalty: float):
    """Greedy on the GPU reading the decoder's logits buffer (device_sampling.py, through onnxruntime-gpu); None
    without it (the logits are then copied to the host)."""
    batch, vocab = logits.shape
    return greedy_on_cuda_logits(logits.ptr, (batch, vocab), penalty)
