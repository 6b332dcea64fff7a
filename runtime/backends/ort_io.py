"""The decode IO of ONNX Runtime sessions with I/O binding (a DecodeIO of runtime/backends/base.py; the table in
runtime/backends/decode_io.py says what each IO does per step)."""
from __future__ import annotations

import numpy as np

from .decode_io import empty_vision
from .device_sampling import DeviceGreedy
from .kv_cache import KVCache


class OrtBoundIO:
    """ONNX Runtime with every decode-step input and output bound once (see the module table)."""

    def __init__(self, model, batch: int, cache_len: int):
        spec, dtype = model.spec, model.manifest.dtype
        t, c = spec.text, spec.text.hidden_size
        self.model, self.dec, self.emb = model, model.sessions["decoder"], model.sessions["embed"]
        new = self.dec.allocate
        # decoder.ort.onnx writes the cache in place when present is bound to past: one set; else ping-pong
        self.cache = KVCache(t.num_hidden_layers, batch, t.num_key_value_heads, cache_len, t.head_dim, dtype,
                             allocate=new, sets=1 if self.dec.kv_in_place else 2)
        self.input_ids = new((batch, 1), "int64")  # [B, 1]
        self.small = {"position_ids": new((3, batch, 1), "int64"), "past_lengths": new((batch,), "int64"),
                      "logits_index": new((batch,), "int64")}  # logits_index stays 0: decode computes one row
        self.logits = new((batch, t.vocab_size), "float32")  # [B, V]
        self.embeds = {"inputs_embeds": new((batch, 1, c), dtype)}  # [B, 1, C]
        if spec.num_deepstack:
            self.embeds["deepstack_embeds"] = new((spec.num_deepstack, batch, 1, c), dtype)  # [Ld, B, 1, C]
        empty = {k: self.emb.allocate(v.shape, dtype) for k, v in empty_vision(spec, dtype).items()}
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
        self.greedy = self._greedy(sampler) if sampler.device_greedy_ok and self.device_greedy else None
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

    def greedy_on_device(self, sampler) -> DeviceGreedy | None:
        """Greedy on the EP's device for `sampler`'s repetition penalty; None on the CPU EP (numpy reads the bound
        logits in place there)."""
        return self._greedy(sampler) if self.device_greedy else None

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
