"""The TensorRT backend: `TrtSession`, a Session of runtime/backends/base.py. TensorRT engines in the runtime: static device buffers, the KV cache in place, CUDA graphs of the decode step.

Not executed on any GPU yet (no GPU in CI; TensorRT-RTX engines do not run on Hopper and full TensorRT is not
installable on these machines). tests/test_trt_session.py runs all of it against a fake TensorRT and a fake CUDA
runtime that simulate device memory and stream capture: buffer planning, the profile check, the aliasing of
`present_*` onto `past_*`, the graph cache, and that a decode step copies nothing but token ids to the host.

- `plan_buffers(contract, ranges)`: every I/O tensor at its largest shape, from `dim_ranges(limits)`, the same
  function export/build_engines.py made the optimization profile from. `check_profile` compares the engine's
  profile with it at load (a mismatch means the engine and manifest.json disagree).
- `TrtSession`: one engine, one execution context, one device buffer per I/O tensor allocated once at load.
  `bind(inputs, outputs)` sets shapes and addresses (host arrays are copied into the static buffers), `execute()`
  enqueues; with CUDA graphs it keeps one captured graph per binding state (every tensor's shape and address),
  as TensorRT-Edge-LLM's EngineExecutor does: the first run of a state is a plain enqueue (it also lets
  TensorRT settle shape-dependent state), the second captures, later ones replay. `in_place` (engines built
  with the plugin library, whose KVCacheAttention aliases present_* to past_*): a `present_*` output is bound
  to its `past_*` input's address, so the cache is written in place.
- `TrtBoundIO` (trt_io.py): its decode IO.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen_vl_trt.model.errors import ArtifactError, BackendUnavailable, PromptTooLong

from .base import check_io
from .cuda import DeviceBuffer, DeviceView
from .cuda import check as _check
from .cuda import cudart as _cudart
from .kv_cache import numpy_dtype

MAX_GRAPHS = 16  # captured graphs kept per engine (oldest destroyed first)


def plan_buffers(contract, ranges: dict) -> dict[str, tuple[tuple, str]]:
    """name -> (largest shape, dtype) of every I/O tensor of `contract` under `ranges` (dim -> (min, opt, max))."""
    return {t.name: (tuple(d if isinstance(d, int) else ranges[d][2] for d in t.dims), t.dtype)
            for t in (*contract.inputs, *contract.outputs)}


def check_profile(engine, contract, ranges: dict, where: str) -> None:
    """The engine's optimization profile 0 must be the one export/build_engines.py derives from the manifest's
    limits: TensorRT would refuse a request the runtime let through, or the buffers would be too small."""
    for t in contract.inputs:
        lo, _, hi = (tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(t.name, 0))
        want_lo = tuple(d if isinstance(d, int) else ranges[d][0] for d in t.dims)
        want_hi = tuple(d if isinstance(d, int) else ranges[d][2] for d in t.dims)
        if (lo, hi) != (want_lo, want_hi):
            raise ArtifactError(f"{where}: input {t.name} has profile min {list(lo)} max {list(hi)}, manifest.json "
                                f"limits give min {list(want_lo)} max {list(want_hi)}; rebuild the engines with "
                                "export_all.sh")


def _trt_dtypes(trt) -> dict:
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
             "BOOL": "bool", "INT8": "int8"}
    return {getattr(trt.DataType, k): v for k, v in names.items() if hasattr(trt.DataType, k)}


class TrtSession:
    """One engine with static buffers (see the module docstring)."""

    def __init__(self, engine_path: Path, contract, trt, cudart, stream, ranges: dict, *, resident=(),
                 in_place: bool = False, cuda_graph: bool = True):
        self.trt, self.cudart, self.stream, self.where = trt, cudart, stream, str(engine_path)
        self.device, self.provider = "cuda", "TensorRT"
        self.logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:
            raise ArtifactError(f"{engine_path}: TensorRT cannot load this engine (built for another GPU or "
                                "TensorRT version?); rebuild it with export_all.sh on this machine")
        self.engine, self.context = engine, engine.create_execution_context()
        dtypes, found = _trt_dtypes(trt), {"input": {}, "output": {}}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            kind = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            dt = engine.get_tensor_dtype(name)
            found[kind][name] = (dtypes.get(dt, str(dt)), len(engine.get_tensor_shape(name)))
        check_io(contract, found["input"], found["output"], self.where)
        check_profile(engine, contract, ranges, self.where)
        self.ranges, self.plan = ranges, plan_buffers(contract, ranges)
        self.input_names = [t.name for t in contract.inputs]
        self.output_names = [t.name for t in contract.outputs]
        self.resident, self.in_place = frozenset(resident), in_place
        # present_key.i -> past_key.i: the plugin writes the cache in place (getAliasedInput)
        self.alias = {n: "past" + n[len("present"):] for n in self.output_names if n.startswith("present_")} \
            if in_place else {}
        self.buffers = {n: DeviceBuffer(shape, dt, cudart) for n, (shape, dt) in self.plan.items() if n not in self.alias}
        self.graph_capture, self.graph_capture_error = cuda_graph, None
        self._state: dict[str, tuple] = {}  # name -> (shape, address) set on the context
        self._seen: set = set()
        self._graphs: dict = {}  # binding state -> cudaGraphExec
        self._keep: list = []

    # ---- buffers ------------------------------------------------------------------------------------------
    def view(self, name: str, shape: tuple) -> DeviceView:
        """The static buffer of `name` seen as `shape` (at most its planned size)."""
        buf = self.buffers[name]
        view = DeviceView(buf.ptr, shape, buf.dtype, self)
        if view.nbytes > buf.nbytes:
            raise PromptTooLong(f"{name} {list(shape)} exceeds the engine's largest {list(buf.shape)}; "
                                "rebuild the engines with larger limits")
        return view

    def allocate(self, shape: tuple, dtype: str) -> DeviceBuffer:
        buf = DeviceBuffer(shape, dtype, self.cudart)
        self.zero(buf)
        return buf

    def zero(self, buf) -> None:
        _check(self.cudart.cudaMemsetAsync(buf.ptr, 0, buf.nbytes, self.stream))

    def copy_in(self, view: DeviceView, host_ptr: int, nbytes: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart.cudaMemcpyAsync(view.ptr, host_ptr, nbytes, kind, self.stream))

    def copy_out(self, host_ptr: int, view: DeviceView, nbytes: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self.cudart.cudaMemcpyAsync(host_ptr, view.ptr, nbytes, kind, self.stream))

    def sync(self) -> None:
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        self._keep = []

    # ---- one execution ------------------------------------------------------------------------------------
    def _set(self, name: str, shape: tuple, ptr: int, is_input: bool) -> None:
        if self._state.get(name) == (shape, ptr):
            return
        if is_input and not self.context.set_input_shape(name, shape):
            raise PromptTooLong(f"{self.where}: input {name} {list(shape)} is outside the engine's profile; "
                                "rebuild the engines with larger limits")
        self.context.set_tensor_address(name, ptr)
        self._state[name] = (shape, ptr)

    def bind(self, inputs: dict, outputs: dict | None = None) -> dict:
        """Set every input (DeviceView/DeviceBuffer as they are, host arrays copied into the static buffers) and
        every output (the given views, else the static buffer, else the aliased input) -> output views."""
        ptrs = {}
        for name in self.input_names:
            value = inputs[name]
            if isinstance(value, np.ndarray):
                host = np.ascontiguousarray(value, numpy_dtype(self.plan[name][1]))
                view = self.view(name, host.shape)
                self.copy_in(view, host.ctypes.data, host.nbytes)
                self._keep.append(host)  # pageable memory: must live until the copy ran
                value = view
            ptrs[name] = value.ptr
            self._set(name, tuple(value.shape), value.ptr, True)
        views = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if outputs and name in outputs:
                view = outputs[name]
            elif name in self.alias:
                view = DeviceView(ptrs[self.alias[name]], shape, self.plan[name][1], self)
            else:
                view = self.view(name, shape)
            self._set(name, shape, view.ptr, False)
            views[name] = view
        return views

    def execute(self, graph: bool = False) -> None:
        """Enqueue with the current binding state; with `graph`, replay (or capture) the state's CUDA graph."""
        state = tuple(sorted(self._state.items()))
        if graph and self.graph_capture:
            if state in self._graphs:
                _check(self.cudart.cudaGraphLaunch(self._graphs[state], self.stream))
                return
            if state in self._seen and self._capture(state):
                return
        if not self.context.execute_async_v3(int(self.stream)):
            raise BackendUnavailable(f"{self.where}: TensorRT execution failed (see the TensorRT log)")
        self._seen.add(state)

    def _capture(self, state) -> bool:
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        _check(self.cudart.cudaStreamBeginCapture(self.stream, mode))
        ok = self.context.execute_async_v3(int(self.stream))
        err, graph = self.cudart.cudaStreamEndCapture(self.stream)
        if not ok or int(err) != 0:  # e.g. data-dependent shapes or a Loop: keep enqueueing instead
            self.graph_capture = False
            self.graph_capture_error = f"stream capture failed (enqueue ok={ok}, CUDA error {int(err)})"
            return False
        exec_ = _check(self.cudart.cudaGraphInstantiate(graph, 0))
        _check(self.cudart.cudaGraphDestroy(graph))
        if len(self._graphs) >= MAX_GRAPHS:
            _check(self.cudart.cudaGraphExecDestroy(self._graphs.pop(next(iter(self._graphs)))))
        self._graphs[state] = exec_
        _check(self.cudart.cudaGraphLaunch(exec_, self.stream))  # capture recorded the work, this runs it
        return True

    def run(self, feeds: dict, device_outputs=()) -> dict:
        """The Session protocol: host or device feeds -> host outputs, except `resident` and `device_outputs`
        names, which stay DeviceViews (of the static output buffers: valid until this session runs again)."""
        views = self.bind(feeds)
        self.execute()
        result = {}
        for name, view in views.items():
            if name in self.resident or name in device_outputs:
                result[name] = view
                continue
            host = np.empty(view.shape, numpy_dtype(view.dtype))
            self.copy_out(host.ctypes.data, view, host.nbytes)
            result[name] = host
        self.sync()
        return result

    def decode_io(self, model, batch: int, cache_len: int):
        """The decode IO of this (decoder) session: static buffers, CUDA graphs (trt_io.py)."""
        from .trt_io import TrtBoundIO

        return TrtBoundIO(model, batch, cache_len)


def open_trt(engines: dict, contracts: dict, plugin_lib: Path | None, ranges: dict, cuda_graph: bool = True) -> dict:
    """The three TrtSessions on one stream; the KV cache is written in place when the plugin library is there."""
    from qwen_vl_trt.model.trt_compat import import_tensorrt, load_plugin_library

    trt = import_tensorrt()
    if plugin_lib is not None:
        try:
            load_plugin_library(plugin_lib, trt=trt)
        except (FileNotFoundError, RuntimeError) as e:
            raise ArtifactError(str(e)) from None
    cudart = _cudart()
    stream = _check(cudart.cudaStreamCreate())
    resident = {name: tuple(t.name for t in c.outputs if t.name.startswith("present_")) for name, c in contracts.items()}
    return {name: TrtSession(path, contracts[name], trt, cudart, stream, ranges, resident=resident[name],
                             in_place=plugin_lib is not None, cuda_graph=cuda_graph)
            for name, path in engines.items()}
