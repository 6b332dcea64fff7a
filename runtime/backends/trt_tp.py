"""The TensorRT tensor-parallel decoder: `TpTrtSession`, one process driving N GPUs (the pattern of Triton's
tensorrt_backend multi-device mode: one model instance owns N GPUs, `ncclCommInitAll`, one communicator per
context, every rank's inputs replicated from rank 0, every rank enqueued before any waits, rank 0's outputs).

    device 0: vision, embed (TrtSession, stream 0) ---inputs_embeds, ids, positions---> rank 0 decoder (stream 0)
                                          cudaMemcpyPeerAsync on stream 0 + event ---> rank r decoder (stream r)
    every rank: its engine decoder.rank{r}.engine, its context, its static buffers and KV heads (a TrtSession)
    every DistCollective layer: NCCL all-reduce over the N communicators (inside TensorRT's enqueue)
    rank 0's logits [B, V] are the result (every rank holds the same: export/tp.py all-reduces the vocab-parallel
    lm_head's zero-padded logits)

`TpTrtSession` has the whole model's decoder interface (the one of trt.TrtSession: view / bind / execute / zero /
copy_in / copy_out / sync / run / decode_io), so trt_io.TrtBoundIO, generate, the in-flight scheduler's slot
prefill and prefix rows (slots.py), the server, the Triton model and trt-run run on it unchanged. Its KV cache is
the ranks' own: the whole-model `[B, Hkv, K, D]` cache views the front-ends take are virtual addresses that
trt_tp_kv.RankedCache translates into each rank's heads (never a whole-model buffer, never a copy per step).

Ordering (why the code looks the way it does):
- A DistCollective layer's NCCL call can block the calling host thread until the other ranks have made theirs
  (NCCL: "each call has to be done from a different thread or process, or need to use Group Semantics"; group
  calls cannot wrap TensorRT's enqueue, which interleaves kernels with the collectives). So each rank's
  `execute_async_v3` runs on that rank's own worker thread, all N are issued before anything waits, and only then
  does anyone synchronise: enqueueing rank 0, waiting for it, then rank 1 would never return.
- `IExecutionContext.set_communicator` is collective too: runtime/backends/nccl.py `set_communicators` makes the N
  calls on N threads, before the first enqueue.
- Inputs are replicated on stream 0 (ordered after the embed engine and the host copies that wrote them, and after
  an event each other rank recorded behind its previous enqueue, so no copy overwrites inputs a rank still reads),
  an event is recorded there, and every other rank's stream waits for it before its enqueue.

CUDA graphs are off (`graph_capture` False): capturing N streams whose kernels include NCCL collectives needs
NCCL's graph-capture support on every rank captured concurrently, and what TensorRT's enqueue does under capture
with a communicator set is not documented; without a GPU here nothing of it could be checked. Decode steps are
plain enqueues.

API facts checked here: the binding is `IExecutionContext.set_communicator(communicator: CapsuleType) -> bool`
("Set the NCCL communicator for the execution context ... This is a collective call: it blocks until every rank
sharing the communicator has called it"; read from the `tensorrt_rtx` 1.7.1.116 Python bindings' docstring on this
machine; full TensorRT has it from 10.16 (the C++ `IExecutionContext::setCommunicator`, docs.nvidia.com TensorRT
10.16 / 11.x API lists) and its 11.4 Python page is docs.nvidia.com/deeplearning/tensorrt/11.4.0/_static/
python-api/infer/Core/ExecutionContext.html). The communicator is passed as a PyCapsule around the ncclComm_t
(nccl.comm_capsule). `LayerType.DIST_COLLECTIVE` marks a TensorRT that can build and run the rank engines.

Not executed on any GPU (none in CI): tests/test_trt_tp.py runs all of it against the fake TensorRT / CUDA of
tests/trt_fakes.py with a fake NCCL whose all-reduce blocks until every rank joined, and rank engines computing
their partial products in numpy; bench/gpu_visit.sh has the world-size-1 and TP-2 GPU steps.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qwen_vl_trt.model.errors import ArtifactError, BackendUnavailable

from .cuda import DeviceView
from .cuda import check as _check
from .kv_cache import numpy_dtype
from .trt import TrtSession
from .trt_tp_kv import RankedCache

MIN_TENSORRT = "10.16"  # the first TensorRT with IDistCollectiveLayer and IExecutionContext::setCommunicator
ENQUEUE_TIMEOUT_S = 300.0  # a rank whose enqueue does not return by then: a collective that never completed


def check_tensorrt(trt) -> None:
    """A BackendUnavailable line when `trt` cannot run tensor-parallel engines (no DIST_COLLECTIVE layer type or
    no `IExecutionContext.set_communicator`: TensorRT older than MIN_TENSORRT)."""
    layer = hasattr(getattr(trt, "LayerType", None), "DIST_COLLECTIVE")
    context = getattr(trt, "IExecutionContext", None)
    if not layer or (context is not None and not hasattr(context, "set_communicator")):
        version = getattr(trt, "__version__", "?")
        raise BackendUnavailable(f"TensorRT {version} has no DistCollective layers / set_communicator: "
                                 f"tensor-parallel engines need TensorRT >= {MIN_TENSORRT} "
                                 f"(pip install 'tensorrt-cu13>={MIN_TENSORRT}')")


def _is_cache(name: str) -> bool:
    return name.startswith(("past_key.", "past_value.", "present_key.", "present_value."))


class TpTrtSession:
    """The whole decoder over `ranks` (TrtSession r on devices[r], module docstring); `comms`: their NCCL
    communicators (already set on the contexts), destroyed by `close`."""

    device, provider = "cuda", "TensorRT"  # as TrtSession: ort_cuda.require_on_gpu and providers_line accept it
    resident = frozenset()  # run() returns host arrays; decode IO keeps the cache in the ranks (RankedCache)
    graph_capture = False
    graph_capture_error = "CUDA graphs are off for tensor-parallel engines (runtime/backends/trt_tp.py)"

    def __init__(self, ranks: list[TrtSession], devices: list[int], contract, kv_spans: list, comms=(), nccl=None):
        self.ranks, self.devices, self.contract = ranks, list(devices), contract
        self.size, self.comms, self.nccl = len(ranks), list(comms), nccl
        r0 = ranks[0]
        self.cudart, self.stream, self.in_place, self.where = r0.cudart, r0.stream, r0.in_place, r0.where
        self.input_names = [t.name for t in contract.inputs]
        self.output_names = [t.name for t in contract.outputs]
        heads = {t.name: t.dims[1] for t in contract.inputs if _is_cache(t.name)}
        self.spans = kv_spans
        # past_key.i (and present_key.i, its own tensor unless written in place) -> the ranks' buffers
        self.caches = {}
        for name in [t.name for t in (*contract.inputs, *contract.outputs) if _is_cache(t.name)]:
            past = "past" + name[len("present"):] if name.startswith("present") else name
            if name.startswith("present") and self.in_place:
                continue
            self.caches[name] = RankedCache(len(self.caches), heads[past], kv_spans,
                                            [rank.buffers[name] for rank in ranks], r0.plan[name][1])
        flags = self.cudart.cudaEventDisableTiming
        # rank_done[r] (r > 0): recorded on rank r's stream after its enqueue; stream 0 waits for it before the next
        # step's copies overwrite rank r's inputs (a step without a sync in between: chunked slot prefill)
        self.rank_done = [None] + [self._on(r, lambda: _check(self.cudart.cudaEventCreateWithFlags(flags)))
                                   for r in range(1, self.size)]
        self._set_device(self.devices[0])  # the event the other ranks' streams wait for: inputs replicated
        self.inputs_ready = _check(self.cudart.cudaEventCreateWithFlags(flags))
        self._workers = [ThreadPoolExecutor(1, thread_name_prefix=f"trt-tp-rank{r}",
                                            initializer=self._set_device, initargs=(d,))
                         for r, d in enumerate(self.devices)]

    # ---- devices ------------------------------------------------------------------------------------------
    def _set_device(self, device: int) -> None:
        _check(self.cudart.cudaSetDevice(device))

    def _on(self, r: int, fn, *args):
        """fn(*args) with rank r's device current (CUDA work goes to that rank's stream); device 0 afterwards."""
        self._set_device(self.devices[r])
        try:
            return fn(*args)
        finally:
            self._set_device(self.devices[0])

    def _ranked(self, view):
        for cache in self.caches.values():
            if isinstance(view, DeviceView) and cache.owns(view.ptr):
                return cache
        return None

    # ---- what the decode IO and the slots call ----------------------------------------------------------
    def view(self, name: str, shape: tuple) -> DeviceView:
        """Rank 0's static buffer of `name` as `shape`; a cache name: the whole-model virtual view (trt_tp_kv)."""
        if name in self.caches:
            cache = self.caches[name]
            view = cache.layout(tuple(shape))
            for rank, rv in zip(self.ranks, cache.rank_views(view)):
                rank.view(name, rv.shape)  # raises PromptTooLong beyond the rank's planned buffer
            return view
        if _is_cache(name):  # a present_* written in place: the past_* buffers
            return self.view("past" + name[len("present"):], shape)
        return self.ranks[0].view(name, shape)

    def allocate(self, shape: tuple, dtype: str):
        return self.ranks[0].allocate(shape, dtype)

    def zero(self, buf) -> None:
        cache = self._ranked(buf)
        if cache is None:
            return self.ranks[0].zero(buf)
        for r, rv in enumerate(cache.rank_views(buf)):
            self._on(r, self.ranks[r].zero, rv)

    def copy_in(self, view: DeviceView, host_ptr: int, nbytes: int) -> None:
        cache = self._ranked(view)
        if cache is None:
            return self.ranks[0].copy_in(view, host_ptr, nbytes)
        for r, rv in cache.row_views(view):  # every rank holding the head gets the rows
            self._on(r, self.ranks[r].copy_in, rv, host_ptr, nbytes)

    def copy_out(self, host_ptr: int, view: DeviceView, nbytes: int) -> None:
        cache = self._ranked(view)
        if cache is None:
            return self.ranks[0].copy_out(host_ptr, view, nbytes)
        r, rv = cache.row_views(view)[0]
        self._on(r, self.ranks[r].copy_out, host_ptr, rv, nbytes)

    def sync(self) -> None:
        for r, rank in enumerate(self.ranks):
            self._on(r, rank.sync)

    # ---- one step -----------------------------------------------------------------------------------------
    def _rank_value(self, r: int, name: str, value):
        """The whole model's cache value as rank r binds it: its heads of a numpy array, or its translated view."""
        if isinstance(value, np.ndarray):
            lo, hi = self.spans[r]
            return np.ascontiguousarray(value[:, lo:hi])
        cache = self._ranked(value)
        if cache is None:
            raise ValueError(f"{name}: a tensor-parallel decoder binds its KV cache through its own views "
                             "(TpTrtSession.view) or host arrays")
        return cache.rank_views(value)[r]

    def bind(self, inputs: dict, outputs: dict | None = None) -> dict:
        """Rank 0 binds the step's inputs (host arrays copied in); the other ranks get copies of rank 0's input
        buffers (cudaMemcpyPeerAsync on stream 0, then an event their streams wait for) and their own KV heads.
        -> rank 0's output views (logits; present_* as the whole-model views given, if any)."""
        outputs = outputs or {}
        per_rank = []
        for r in range(self.size):
            ins = {n: self._rank_value(r, n, v) for n, v in inputs.items() if _is_cache(n)}
            outs = {n: self._rank_value(r, n, v) for n, v in outputs.items() if _is_cache(n)}
            per_rank.append((ins, outs))
        plain = {n: v for n, v in inputs.items() if not _is_cache(n)}
        views = self.ranks[0].bind({**plain, **per_rank[0][0]},
                                   {**{n: v for n, v in outputs.items() if not _is_cache(n)}, **per_rank[0][1]})
        if self.size == 1:
            return views
        for r in range(1, self.size):  # rank r's previous step has read its inputs
            _check(self.cudart.cudaStreamWaitEvent(self.stream, self.rank_done[r], 0))
        for name in plain:
            shape, src = self.ranks[0]._state[name]
            for r in range(1, self.size):
                dst = self.ranks[r].view(name, shape)
                _check(self.cudart.cudaMemcpyPeerAsync(dst.ptr, self.devices[r], src, self.devices[0], dst.nbytes,
                                                       self.stream))
                per_rank[r][0][name] = dst
        _check(self.cudart.cudaEventRecord(self.inputs_ready, self.stream))
        for r in range(1, self.size):
            self._on(r, self._wait_inputs, self.ranks[r].stream)
            self._on(r, self.ranks[r].bind, *per_rank[r])
        return {n: outputs.get(n, v) for n, v in views.items()}

    def _wait_inputs(self, stream) -> None:
        _check(self.cudart.cudaStreamWaitEvent(stream, self.inputs_ready, 0))

    def execute(self, graph: bool = False) -> None:
        """Enqueue every rank, each on its own thread (its collectives may block until the others join), and
        wait until every enqueue has returned; nothing is synchronised here (the caller's `sync` does)."""
        futures = [w.submit(rank.execute) for w, rank in zip(self._workers, self.ranks)]
        errors = []
        for r, f in enumerate(futures):
            try:
                f.result(timeout=ENQUEUE_TIMEOUT_S)
            except TimeoutError:
                errors.append(f"rank {r}: enqueue did not return in {ENQUEUE_TIMEOUT_S:.0f} s (a collective "
                              "waiting for a rank that never joined)")
            except Exception as e:  # one line per rank; the first is raised
                errors.append(f"rank {r}: {e}")
        if errors:
            raise BackendUnavailable(f"tensor-parallel step failed: {errors[0]}")
        for r in range(1, self.size):
            self._on(r, lambda r=r: _check(self.cudart.cudaEventRecord(self.rank_done[r], self.ranks[r].stream)))

    def run(self, feeds: dict, device_outputs=()) -> dict:
        """The Session protocol with whole-model host feeds (past_* [B, Hkv, K, D] split over the ranks' heads) ->
        host logits [B, V] and present_* [B, Hkv, K, D] put back together from the ranks (the first holder of each
        head). `device_outputs`: logits may stay a DeviceView of rank 0."""
        views = self.bind(feeds)
        self.execute()
        result = {}
        for name, view in views.items():
            if name in device_outputs and not _is_cache(name):
                result[name] = view
            elif _is_cache(name):
                result[name] = self._gather_cache(name, view.shape)
            else:
                host = np.empty(view.shape, numpy_dtype(view.dtype))
                self.ranks[0].copy_out(host.ctypes.data, view, host.nbytes)
                result[name] = host
        self.sync()
        return result

    def _gather_cache(self, name: str, shape_r0: tuple) -> np.ndarray:
        heads = self.contract_heads(name)
        b, _, k, d = shape_r0
        dtype = self.ranks[0].plan[name][1]
        out = np.empty((b, heads, k, d), numpy_dtype(dtype))
        done = set()
        for r, (lo, hi) in enumerate(self.spans):
            if (lo, hi) in done:
                continue
            done.add((lo, hi))
            part = np.empty((b, hi - lo, k, d), numpy_dtype(dtype))
            _, ptr = self.ranks[r]._state[name]
            self._on(r, self.ranks[r].copy_out, part.ctypes.data, DeviceView(ptr, part.shape, dtype), part.nbytes)
            self._on(r, self.ranks[r].sync)
            out[:, lo:hi] = part
        return out

    def contract_heads(self, name: str) -> int:
        past = "past" + name[len("present"):] if name.startswith("present") else name
        return next(t.dims[1] for t in self.contract.inputs if t.name == past)

    def decode_io(self, model, batch: int, cache_len: int):
        from .trt_io import TrtBoundIO

        return TrtBoundIO(model, batch, cache_len)

    def close(self) -> None:
        for w in self._workers:
            w.shutdown(wait=False)
        if self.nccl is not None and self.comms:
            self.nccl.destroy(self.comms)
            self.comms = []


def open_decoder_ranks(rank_engines: list[Path], rank_contracts: list, contract, kv_spans: list,
                       plugin_lib: Path | None, ranges: dict, *, trt=None, cudart=None, nccl=None) -> TpTrtSession:
    """The TpTrtSession over `len(rank_engines)` GPUs (devices 0..N-1): per rank its device, stream, engine and
    static buffers, then one NCCL communicator per device (`ncclCommInitAll`) set on every context at once.
    One-line errors: a missing rank engine, a TensorRT too old, fewer visible GPUs than ranks, no NCCL."""
    from qwen_vl_trt.model.trt_compat import import_tensorrt, load_plugin_library

    from .cuda import cudart as _cudart
    from .nccl import Nccl, set_communicators

    size = len(rank_engines)
    missing = [str(p) for p in rank_engines if not Path(p).is_file()]
    if missing:
        raise ArtifactError(f"{missing[0]} is missing: a --tp {size} export needs one engine per rank; re-run "
                            "export_all.sh with TensorRT >= " + MIN_TENSORRT)
    trt = trt or import_tensorrt()
    check_tensorrt(trt)
    cudart = cudart or _cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < size:
        raise BackendUnavailable(f"a --tp {size} export needs {size} GPUs, {0 if int(err) else count} visible "
                                 "(CUDA_VISIBLE_DEVICES?); use --backend onnxruntime for the CPU ranks")
    nccl = nccl or Nccl()  # BackendUnavailable line when libnccl.so.2 is missing
    if plugin_lib is not None:
        try:
            load_plugin_library(plugin_lib, trt=trt)
        except (FileNotFoundError, RuntimeError) as e:
            raise ArtifactError(str(e)) from None
    devices, ranks = list(range(size)), []
    for r, path in enumerate(rank_engines):
        _check(cudart.cudaSetDevice(devices[r]))
        stream = _check(cudart.cudaStreamCreate())
        ranks.append(TrtSession(path, rank_contracts[r], trt, cudart, stream, ranges, in_place=plugin_lib is not None,
                                cuda_graph=False))
    _check(cudart.cudaSetDevice(devices[0]))
    comms = nccl.comm_init_all(devices)
    try:
        set_communicators([rank.context for rank in ranks], comms)
    except BackendUnavailable:
        nccl.destroy(comms)
        raise
    return TpTrtSession(ranks, devices, contract, kv_spans, comms, nccl)


def open_trt_tp(engines: dict, rank_engines: list[Path], contracts: dict, rank_contracts: list, kv_spans: list,
                plugin_lib: Path | None, ranges: dict, *, cuda_graph: bool = True, trt=None, cudart=None,
                nccl=None) -> dict:
    """vision and embed TrtSessions on device 0 (rank 0's stream) and the TpTrtSession (`open_decoder_ranks`)."""
    from qwen_vl_trt.model.trt_compat import import_tensorrt

    from .cuda import cudart as _cudart

    trt, cudart = trt or import_tensorrt(), cudart or _cudart()
    decoder = open_decoder_ranks(rank_engines, rank_contracts, contracts["decoder"], kv_spans, plugin_lib, ranges,
                                 trt=trt, cudart=cudart, nccl=nccl)
    sessions = {name: TrtSession(engines[name], contracts[name], trt, cudart, decoder.stream, ranges,
                                 in_place=plugin_lib is not None, cuda_graph=cuda_graph)
                for name in ("vision", "embed")}
    sessions["decoder"] = decoder
    return sessions
