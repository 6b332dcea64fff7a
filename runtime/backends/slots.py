"""One sequence's prompt written into one slot of a batch's KV cache: the prefill half of in-flight batching.

The scheduler (runtime/scheduler.py) keeps ONE decode IO of `max_batch` sequences (runtime/backends/decode_io.py; the
same object `generate` uses, so the decode step is the same bound, graph-replayed call) and prefills each new
request alone, as a batch of one, whose cache inputs and outputs are the request's slot of the batch cache:
`past_*.{i}[slot]` is one contiguous block of the [B, Hkv, K, D] buffer (batch is the leading dim), so a slot is
the buffer's address + slot * Hkv*K*D*itemsize with shape [1, Hkv, K, D]. Nothing is copied between slots.

| IO | slot view |
|---|---|
| `HostIO` (numpy caches) | `buf[slot:slot + 1]` fed, `present_*[0]` written back into `buf[slot]` |
| `OrtBoundIO` | `IOBinding.bind_input/bind_output(name, device, 0, onnx type, [1, Hkv, K, D], ptr)` (raw pointers) |
| `TrtBoundIO` | a `DeviceView` at the slot's address (TensorRT binds any address) |

Why alone and not in the decode batch: decoder.ort.onnx's GroupQueryAttention accepts a step with S > 1 and
B > 1 only into an empty cache (export/ort_fused.py). A chunked prefill (several calls per prompt, past > 0 and
S > 1) needs a decoder that continues a cache with S > 1 -- decoder.onnx, the KVCacheAttention plugin and, for one
sequence, decoder.ort.onnx (its `total_sequence_length` is cache_len for B = 1: ONNX Runtime's "subsequent
prompt", export/ort_fused.py) -- and a cache read and written in the same buffers: with two ping-pong KV sets
(decoder.onnx on ONNX Runtime, TensorRT without the plugin library) a step reads one set and writes the other.
There a prompt is written in ONE call from an empty cache (past read from the other set's slot, never attended,
present into the current set). `chunks_allowed(io)` says which.

A reused prefix (runtime/prefix_cache.py) is rows [0, n) copied into the slot before its prompt's first call
(`write_rows`; `read_rows` copies a slot's rows out), and the prompt then continues from past = n.
`continuation(io)` says how a prompt continues rows already in its slot:

| mode | IO | the rest of the prompt |
|---|---|---|
| "chunks" | `chunks_allowed`: numpy caches, or one KV set written in place (decoder.ort.onnx, the plugin engines) | any number of tokens per call |
| "one_call" | ping-pong KV sets | one call: it reads the slot's rows from the other set (where `write_rows` put them) and writes the whole slot, prefix included, into the current set |
"""
from __future__ import annotations

import numpy as np

from .cuda import DeviceView
from .decode_io import HostIO, _host
from .kv_cache import numpy_dtype
from .ort import _ORT_TYPES
from .ort_io import OrtBoundIO

_ONNX_TYPE = {"tensor(float)": (1, 4), "tensor(float16)": (10, 2), "tensor(bfloat16)": (16, 2)}  # (onnx code, bytes)


def chunks_allowed(io) -> bool:
    """Whether a prompt may be written in several calls (past_lengths > 0 with S > 1): every decoder continues
    one sequence's cache with S > 1 (decoder.onnx, the KVCacheAttention plugin, decoder.ort.onnx's
    GroupQueryAttention for B = 1: export/ort_fused.py), so it is whether the cache is read and written in the same
    buffers (numpy caches, or one KV set written in place)."""
    return isinstance(io, HostIO) or len(io.cache.sets) == 1


def continuation(io) -> str:
    """"chunks" or "one_call": how a prompt continues rows already in its slot (module table)."""
    return "chunks" if chunks_allowed(io) else "one_call"


def prefill_slot(io, slot: int, feeds: dict, past: int, last: bool = True) -> np.ndarray | None:
    """Write one prompt chunk of a sequence into `slot` of `io`'s cache -> logits float32 [V] of its last row, on
    the host; None when not `last` (a chunk before the prompt's last one: its logits stay on the device).

    `feeds`: `inputs_embeds` [1, S, C], `deepstack_embeds` [Ld, 1, S, C] (Qwen3-VL), `position_ids` int64
    [3, 1, S] (host arrays); `past`: rows of this sequence already in the slot (0 for the first chunk; with
    "one_call" continuation, the rows `write_rows` put in the other set)."""
    steps = {"past_lengths": np.array([past], np.int64),
             "logits_index": np.array([feeds["inputs_embeds"].shape[1] - 1], np.int64)}
    if isinstance(io, HostIO):
        logits = _host_prefill(io, slot, {**feeds, **steps})
    elif isinstance(io, OrtBoundIO):
        logits = _ort_prefill(io, slot, {**feeds, **steps}, past, last)
    else:
        logits = _trt_prefill(io, slot, {**feeds, **steps}, past, last)
    return logits if last else None


def _sets(io) -> tuple[dict, dict]:
    """(set read as past_*, set written as present_*): the current set, or with ping-pong the other set's slot as
    the past (unread for an empty slot, else the rows `write_rows` put there) so that the prompt lands in the
    current set."""
    cache = io.cache
    write = cache.sets[cache.current]
    read = write if len(cache.sets) == 1 else cache.sets[(cache.current + 1) % len(cache.sets)]
    return read, write


def read_rows(io, slot: int, n: int) -> dict:
    """Host copies of rows [0, n) of `slot` in the set that holds the cache: past_* name -> [Hkv, n, D]."""
    rows = {name: _copy_rows(io, buf, slot, n, None) for name, buf in io.cache.buffers.items()}
    _sync(io)
    return rows


def write_rows(io, slot: int, rows: dict) -> None:
    """Copy `rows` (past_* name -> [Hkv, n, D] host arrays) into rows [0, n) of `slot` in the set the slot's next
    prefill call reads as its past."""
    for name, buf in _sets(io)[0].items():
        _copy_rows(io, buf, slot, rows[name].shape[1], rows[name])
    _sync(io)


def _copy_rows(io, buf, slot: int, n: int, host: np.ndarray | None) -> np.ndarray:
    """Rows [0, n) of buf[slot] ([B, Hkv, K, D]) -> a new host array [Hkv, n, D], or `host` -> those rows."""
    if isinstance(buf, np.ndarray):
        if host is None:
            return np.array(buf[slot, :, :n])
        buf[slot, :, :n] = host
        return host
    if isinstance(buf, DeviceView):  # TensorRT: one copy per head on the session's stream
        _, heads, k, d = buf.shape
        itemsize = numpy_dtype(buf.dtype).itemsize
        out = np.empty((heads, n, d), numpy_dtype(buf.dtype)) if host is None else np.ascontiguousarray(host)
        for h in range(heads):
            view = DeviceView(buf.ptr + (slot * heads + h) * k * d * itemsize, (n, d), buf.dtype, buf.owner)
            if host is None:
                io.dec.copy_out(out[h].ctypes.data, view, view.nbytes)
            else:
                io.dec.copy_in(view, out[h].ctypes.data, view.nbytes)
        io.keep_rows = [*getattr(io, "keep_rows", []), out]  # the copies read it until _sync
        return out
    return _ort_rows(buf, slot, n, host)


def _ort_rows(value, slot: int, n: int, host: np.ndarray | None) -> np.ndarray:
    """_copy_rows for an OrtValue: a numpy view of its memory on the CPU EP, one 2-D copy on the CUDA EP."""
    import ctypes

    _, heads, k, d = value.shape()
    dtype = numpy_dtype(_ORT_TYPES[value.data_type()])
    if value.device_name().lower() == "cpu":
        nbytes = heads * k * d * dtype.itemsize * value.shape()[0]
        raw = (ctypes.c_byte * nbytes).from_address(value.data_ptr())
        whole = np.frombuffer(raw, np.uint8).view(dtype).reshape(value.shape())
        return _copy_rows(None, whole, slot, n, host)
    from .cuda import check, cudart  # CUDA EP: needs cuda-python (not run here: no GPU in CI)

    rt = cudart()
    out = np.empty((heads, n, d), dtype) if host is None else np.ascontiguousarray(host)
    row, pitch = n * d * dtype.itemsize, k * d * dtype.itemsize
    slot_ptr = value.data_ptr() + slot * heads * pitch
    if host is None:
        check(rt.cudaMemcpy2D(out.ctypes.data, row, slot_ptr, pitch, row, heads,
                              rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))
    else:
        check(rt.cudaMemcpy2D(slot_ptr, pitch, out.ctypes.data, row, row, heads,
                              rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
    return out


def _sync(io) -> None:
    """TensorRT: wait for the copies on the session's stream (the others copy synchronously)."""
    if not isinstance(io, (HostIO, OrtBoundIO)):
        io.dec.sync()
        io.keep_rows = []


def _host_prefill(io: HostIO, slot: int, feeds: dict) -> np.ndarray:
    buffers = io.cache.buffers
    out = io.model.sessions["decoder"].run({**feeds, **{n: b[slot:slot + 1] for n, b in buffers.items()}})
    for name, buf in buffers.items():
        buf[slot] = _host(out[f"present{name[4:]}"])[0]
    return _host(out["logits"])[0]


def _ort_slot(value, slot: int) -> tuple:
    """(device, onnx type, [1, Hkv, K, D], address) of row `slot` of an OrtValue [B, Hkv, K, D]."""
    shape = list(value.shape())
    onnx_type, itemsize = _ONNX_TYPE[value.data_type()]
    per_slot = int(np.prod(shape[1:])) * itemsize
    return value.device_name(), 0, onnx_type, [1, *shape[1:]], value.data_ptr() + slot * per_slot


def _ort_prefill(io: OrtBoundIO, slot: int, feeds: dict, past: int, last: bool) -> np.ndarray | None:
    dec = io.dec
    read, write = _sets(io)
    binding = dec.sess.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, dec._ortvalue(value))
    for name, buf in read.items():
        binding.bind_input(name, *_ort_slot(buf, slot))
    for name in dec.output_names:  # bound in output order: get_outputs() follows it
        if name == "logits":
            binding.bind_output(name, "cpu" if last else dec.device)
        else:
            binding.bind_output(name, *_ort_slot(write[f"past{name[7:]}"], slot))
    dec.sess.run_with_iobinding(binding, io.prefill_options)
    return binding.get_outputs()[dec.output_names.index("logits")].numpy()[0] if last else None


def _trt_prefill(io, slot: int, feeds: dict, past: int, last: bool) -> np.ndarray | None:
    """TensorRT (not executed in CI: no GPU there). Mirrors TrtBoundIO.prefill with slot views."""
    from .trt import DeviceView

    dec = io.dec
    read, write = _sets(io)

    def view(v):
        per_slot = v.nbytes // v.shape[0]
        return DeviceView(v.ptr + slot * per_slot, (1, *v.shape[1:]), v.dtype, v.owner)

    logits = dec.view("logits", (1, io.logits.shape[1]))
    outputs = {"logits": logits, **{f"present{n[4:]}": view(v) for n, v in write.items()}}
    dec.bind({**feeds, **{n: view(v) for n, v in read.items()}}, outputs)
    dec.execute()
    dec.zero(io.small["logits_index"])  # the decode binding reads row 0 of every sequence
    if not last:
        return None
    host = np.empty((1, logits.shape[1]), np.float32)
    dec.copy_out(host.ctypes.data, logits, host.nbytes)
    dec.sync()
    return host[0]
