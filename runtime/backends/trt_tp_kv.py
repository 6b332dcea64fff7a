"""The whole model's KV cache seen through N tensor-parallel ranks' caches: `RankedCache` (runtime/backends/trt_tp.py).

The front-ends (trt_io.TrtBoundIO, the scheduler's slot prefill and prefix rows in slots.py) address the decoder's
KV cache as the whole model's `[B, Hkv, K, D]` buffers and do pointer arithmetic on them: a slot is
`ptr + slot * Hkv*K*D*itemsize` with shape `[1, Hkv, K, D]`, a row block `ptr + (slot*Hkv + h)*K*D*itemsize` with
shape `[n, D]`. Under tensor parallelism rank r holds only its KV heads `[lo_r, hi_r)` (model/tp.py
`TensorParallel.kv_heads`: a slice, or one replicated head when N > Hkv) in its own `[B, Hkv_r, K, D]` buffer on
its own GPU, and no whole-model buffer exists anywhere.

So each whole-model cache tensor gets a *virtual* address range (`VIRTUAL_BASE` and up: above the 47-bit user
address space of x86-64 and aarch64 Linux, so it can never be a real host or device pointer) and a `RankedCache`
translates a view inside it into the ranks' real views: `[b, Hkv, K, D]` -> `[b, Hkv_r, K, D]` at the same slot
on every rank, `(slot, head h)` rows -> the same rows on each rank holding h (all of them to write, the first to
read). A virtual address never reaches TensorRT or CUDA: trt_tp.TpTrtSession translates before binding or copying.
The layout of the whole-model buffer (its K) is the one of the view `TrtBoundIO` took of it (`layout`).
"""
from __future__ import annotations

from .cuda import DeviceView
from .kv_cache import numpy_dtype

VIRTUAL_BASE = 1 << 60  # far above any canonical user-space pointer (< 2**47)
VIRTUAL_STRIDE = 1 << 44  # room per cache tensor (16 TiB)


class RankedCache:
    """One whole-model cache tensor (past_key.i, ...) over the ranks: `spans[r]` = (lo, hi) KV heads of rank r,
    `buffers[r]` = rank r's static buffer (DeviceBuffer or DeviceView, [Bmax, Hkv_r, Kmax, D])."""

    def __init__(self, index: int, heads: int, spans: list, buffers: list, dtype: str):
        self.base, self.heads, self.spans, self.buffers, self.dtype = (VIRTUAL_BASE + index * VIRTUAL_STRIDE,
                                                                        heads, spans, buffers, dtype)
        self.itemsize = numpy_dtype(dtype).itemsize
        self.k = self.d = None  # the layout of the whole-model view taken of it (`layout`)

    def owns(self, ptr: int) -> bool:
        return self.base <= ptr < self.base + VIRTUAL_STRIDE

    def layout(self, shape: tuple) -> DeviceView:
        """The whole-model view [B, Hkv, K, D] at the virtual base; sets the K and D later offsets are read with."""
        b, h, self.k, self.d = shape
        if h != self.heads:
            raise ValueError(f"a cache view has {h} KV heads, the model {self.heads}")
        return DeviceView(self.base, shape, self.dtype)

    def _block(self, ptr: int) -> tuple[int, int, int]:
        """(sequence b, head h, byte offset inside the [K, D] block) of a virtual address."""
        if self.k is None:
            raise ValueError("a tensor-parallel cache view was used before its layout was set")
        block = self.k * self.d * self.itemsize
        off = ptr - self.base
        return off // block // self.heads, off // block % self.heads, off % block

    def rank_views(self, view: DeviceView) -> list[DeviceView]:
        """A whole-model view [b, Hkv, K', D] starting at a slot boundary -> rank r's view [b, Hkv_r, K', D] at the
        same slot (what each rank's engine binds)."""
        seq, head, inside = self._block(view.ptr)
        if head or inside or len(view.shape) != 4 or view.shape[1] != self.heads:
            raise ValueError(f"tensor-parallel cache views bind whole slots [b, {self.heads}, K, D]; got "
                             f"{list(view.shape)} at head {head} offset {inside}")
        out = []
        for (lo, hi), buf in zip(self.spans, self.buffers):
            per_head = self.k * self.d * self.itemsize
            ptr = buf.ptr + seq * (hi - lo) * per_head
            out.append(DeviceView(ptr, (view.shape[0], hi - lo, *view.shape[2:]), self.dtype))
        return out

    def row_views(self, view: DeviceView) -> list[tuple[int, DeviceView]]:
        """A view inside one (sequence, head) block (e.g. rows [0, n) of a slot's head h, shape [n, D]) ->
        [(rank, the same bytes in that rank's buffer)] for every rank holding head h."""
        seq, head, inside = self._block(view.ptr)
        block = self.k * self.d * self.itemsize
        if inside + view.nbytes > block:
            raise ValueError(f"a tensor-parallel cache row view {list(view.shape)} crosses a KV head boundary")
        return [(r, DeviceView(buf.ptr + (seq * (hi - lo) + head - lo) * block + inside, view.shape, self.dtype))
                for r, ((lo, hi), buf) in enumerate(zip(self.spans, self.buffers)) if lo <= head < hi]
