"""One protocol for ONNX Runtime sessions and TensorRT engines: `Session.run(feeds) -> outputs`.

At load every session discovers its I/O (ORT `get_inputs/get_outputs`; TensorRT `num_io_tensors`,
`get_tensor_name`, `get_tensor_mode`, as TRT's `samples/python/detectron2/infer.py:TensorRTInfer`) and
checks names, dtypes and ranks against the manifest's GraphSpec: a mismatch is an ArtifactError, never a
warning. Outputs named in `resident` (the decoder's `present_*` caches) stay on the device between steps
and are fed back as the next `past_*` without a host round trip; `allocate(shape, dtype)` makes a zeroed
buffer of the kind `run` accepts for them.

- `OrtSession`: CPU EP with plain numpy I/O; with `io_binding=True` (always on the CUDA EP) it binds
  OrtValues, so the KV cache lives on the EP's device. The binding path runs on the CPU EP too (tests).
- `TrtSession`: engines through `tensorrt` / `tensorrt_rtx` (export/trt_compat.py), device buffers and a
  CUDA stream from `cuda.bindings` (cuda-python), shapes set per call, `execute_async_v3`.
  Not executed in CI (no GPU there); see README "What is verified where".
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import ArtifactError, BackendUnavailable
from .kv_cache import numpy_dtype

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32"}


class Session(Protocol):
    resident: frozenset

    def run(self, feeds: dict) -> dict: ...

    def allocate(self, shape: tuple, dtype: str): ...


def check_io(contract, inputs: dict, outputs: dict, where: str) -> None:
    """`inputs`/`outputs`: name -> (dtype name, rank) as found in the graph/engine; raise on any difference."""
    problems = []
    for kind, specs, found in (("input", contract.inputs, inputs), ("output", contract.outputs, outputs)):
        expected = {t.name: (t.dtype, len(t.dims)) for t in specs}
        problems += [f"{kind} {n} missing" for n in expected if n not in found]
        problems += [f"unexpected {kind} {n}" for n in found if n not in expected]
        problems += [f"{kind} {n} is {found[n][0]} rank {found[n][1]}, contract says {e[0]} rank {e[1]}"
                     for n, e in expected.items() if n in found and tuple(found[n]) != e]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ArtifactError(f"{where} does not match the manifest contract of the {contract.name} graph: "
                            f"{'; '.join(problems[:3])}{more}; re-run export_all.sh for these artifacts")


class OrtSession:
    """onnxruntime InferenceSession; `io_binding` keeps `resident` outputs as OrtValues on the EP's device."""

    def __init__(self, path: Path, contract, *, providers=("CPUExecutionProvider",), io_binding: bool = False,
                 resident=(), threads: int = 0):
        import onnxruntime as ort

        self.ort = ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.sess = ort.InferenceSession(str(path), opts, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "NOT_IMPLEMENTED" in msg and list(providers) == ["CPUExecutionProvider"]:
                raise BackendUnavailable(
                    f"{path}: ONNX Runtime's CPU provider has no kernel for an op of this graph ({msg}); bf16/fp16 "
                    "graphs need onnxruntime-gpu or TensorRT engines, or re-export with --dtype fp32 for the CPU"
                ) from None
            raise ArtifactError(f"{path}: onnxruntime cannot load it ({msg}); re-run export_all.sh") from None
        found_in = {i.name: (_ORT_TYPES.get(i.type, i.type), len(i.shape)) for i in self.sess.get_inputs()}
        found_out = {o.name: (_ORT_TYPES.get(o.type, o.type), len(o.shape)) for o in self.sess.get_outputs()}
        check_io(contract, found_in, found_out, str(path))
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.device = "cuda" if "CUDAExecutionProvider" in self.sess.get_providers() else "cpu"
        # bf16 has no numpy type in onnxruntime's Python API: only bound OrtValues carry it
        has_bf16 = any(d == "bfloat16" for d, _ in (*found_in.values(), *found_out.values()))
        self.io_binding = io_binding or has_bf16 or self.device == "cuda"
        self.resident = frozenset(resident) if self.io_binding else frozenset()

    def allocate(self, shape: tuple, dtype: str):
        zeros = np.zeros(shape, numpy_dtype(dtype))
        if not self.io_binding:
            return zeros
        if dtype != "bfloat16":
            return self.ort.OrtValue.ortvalue_from_numpy(zeros, self.device, 0)
        value = self.ort.OrtValue.ortvalue_from_shape_and_type(shape, _ONNX_BF16, self.device, 0)
        value.update_inplace(zeros.view(np.uint16))  # all-zero bits == bf16 zeros
        return value

    def _ortvalue(self, value: np.ndarray):
        """numpy -> CPU OrtValue; ml_dtypes bfloat16 goes in as its uint16 bits tagged BFLOAT16."""
        value = np.ascontiguousarray(value)
        if value.dtype == numpy_dtype("bfloat16"):
            return self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value.view(np.uint16), _ONNX_BF16)
        return self.ort.OrtValue.ortvalue_from_numpy(value)

    def run(self, feeds: dict) -> dict:
        if not self.io_binding:
            return dict(zip(self.output_names, self.sess.run(None, feeds)))
        binding = self.sess.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value if isinstance(value, self.ort.OrtValue) else self._ortvalue(value))
        for name in self.output_names:
            binding.bind_output(name, self.device if name in self.resident else "cpu", 0)
        self.sess.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: (v if name in self.resident else _to_numpy(v)) for name, v in zip(self.output_names, values)}


_ONNX_BF16 = 16  # onnx.TensorProto.BFLOAT16


def _to_numpy(value) -> np.ndarray:
    """A CPU OrtValue -> numpy; bfloat16 (which OrtValue.numpy() refuses) is copied out as ml_dtypes.bfloat16."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    shape = tuple(value.shape())
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:
        return np.zeros(shape, numpy_dtype("bfloat16"))
    import ctypes

    bits = np.ctypeslib.as_array((ctypes.c_uint16 * n).from_address(value.data_ptr()))
    return bits.copy().view(numpy_dtype("bfloat16")).reshape(shape)


def ort_providers() -> tuple[str, ...]:
    """CUDA EP first when this onnxruntime build has it (onnxruntime-gpu), else the CPU EP."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return (("CUDAExecutionProvider",) if "CUDAExecutionProvider" in available else ()) + ("CPUExecutionProvider",)


def open_ort(paths: dict, contracts: dict, *, io_binding: bool = False, threads: int = 0) -> dict:
    providers = ort_providers()
    return {name: OrtSession(paths[name], contracts[name], providers=providers, io_binding=io_binding,
                             resident=_cache_outputs(contracts[name]), threads=threads) for name in paths}


def _cache_outputs(contract) -> tuple[str, ...]:
    return tuple(t.name for t in contract.outputs if t.name.startswith("present_"))


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when a TensorRT module, cuda-python and a CUDA GPU are all there, else (False, why)."""
    try:
        from qwen_vl_trt.export.trt_compat import import_tensorrt

        import_tensorrt()
    except ImportError:
        return False, "no TensorRT module (tensorrt or tensorrt_rtx) is installed"
    try:
        cudart = _cudart()
    except ImportError:
        return False, "cuda-python (cuda.bindings) is not installed; pip install cuda-python"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        return False, "no CUDA GPU is visible"
    return True, ""


def open_sessions(manifest, backend: str = "auto", *, io_binding: bool = False, threads: int = 0) -> tuple[str, dict]:
    """-> (backend used, {"vision"|"embed"|"decoder": Session}). `backend`: auto | tensorrt | onnxruntime."""
    if backend not in ("auto", "tensorrt", "onnxruntime"):
        raise BackendUnavailable(f"unknown backend {backend!r}; use auto, tensorrt or onnxruntime")
    engines = manifest.engine_paths()
    if backend == "tensorrt" or (backend == "auto" and engines):
        ok, why = tensorrt_available()
        if backend == "tensorrt" and not ok:
            raise BackendUnavailable(f"--backend tensorrt: {why}; use --backend onnxruntime")
        if backend == "tensorrt" and not engines:
            raise ArtifactError(f"--backend tensorrt: {manifest.directory} has no TensorRT engines; run export_all.sh "
                                "on a machine with TensorRT, or use --backend onnxruntime")
        if ok and engines:
            return "tensorrt", open_trt(engines, manifest.contracts, manifest.plugin_library())
    return "onnxruntime", open_ort(manifest.graph_paths(), manifest.contracts, io_binding=io_binding,
                                   threads=threads)


# ---- TensorRT ------------------------------------------------------------------------------------------------

def _cudart():
    """cuda-python's runtime API module (`cuda.bindings.runtime`, or `cuda.cudart` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def _check(result):
    """cuda-python calls return (err, *values): raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendUnavailable(f"CUDA error {int(err)} ({err}); check the GPU and driver")
    return values[0] if len(values) == 1 else (values or None)


class DeviceBuffer:
    """A cudaMalloc'd buffer with shape and dtype; freed when dropped."""

    def __init__(self, shape: tuple, dtype: str, cudart):
        self.shape, self.dtype, self.cudart = tuple(int(d) for d in shape), dtype, cudart
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * numpy_dtype(dtype).itemsize
        self.ptr = _check(cudart.cudaMalloc(max(self.nbytes, 1)))

    def __del__(self):
        if getattr(self, "ptr", None) is not None:
            self.cudart.cudaFree(self.ptr)


def _trt_dtypes(trt) -> dict:
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
             "BOOL": "bool", "INT8": "int8"}
    return {getattr(trt.DataType, k): v for k, v in names.items() if hasattr(trt.DataType, k)}


class TrtSession:
    """A TensorRT engine run with device buffers on one CUDA stream; `resident` outputs ping-pong between two
    device buffers per name so a step never writes the cache it reads."""

    def __init__(self, engine_path: Path, contract, trt, cudart, stream, resident=()):
        self.trt, self.cudart, self.stream = trt, cudart, stream
        self.logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:
            raise ArtifactError(f"{engine_path}: TensorRT cannot load this engine (built for another GPU or "
                                "TensorRT version?); rebuild it with export_all.sh on this machine")
        self.engine, self.context = engine, engine.create_execution_context()
        dtypes = _trt_dtypes(trt)
        found = {"input": {}, "output": {}}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            kind = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            found[kind][name] = (dtypes.get(engine.get_tensor_dtype(name), str(engine.get_tensor_dtype(name))),
                                 len(engine.get_tensor_shape(name)))
        check_io(contract, found["input"], found["output"], str(engine_path))
        self.dtypes = {**{n: d for n, (d, _) in found["input"].items()}, **{n: d for n, (d, _) in found["output"].items()}}
        self.output_names = [t.name for t in contract.outputs]
        self.resident = frozenset(resident)
        self._inputs: dict[str, DeviceBuffer] = {}
        self._outputs: dict[str, list[DeviceBuffer]] = {}

    def allocate(self, shape: tuple, dtype: str) -> DeviceBuffer:
        buf = DeviceBuffer(shape, dtype, self.cudart)
        _check(self.cudart.cudaMemsetAsync(buf.ptr, 0, buf.nbytes, self.stream))
        return buf

    def _upload(self, name: str, value: np.ndarray) -> DeviceBuffer:
        host = np.ascontiguousarray(value, dtype=numpy_dtype(self.dtypes[name]))
        buf = self._inputs.get(name)
        if buf is None or buf.nbytes < host.nbytes:
            buf = self._inputs[name] = DeviceBuffer(host.shape, self.dtypes[name], self.cudart)
        buf.shape = host.shape
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart.cudaMemcpyAsync(buf.ptr, host.ctypes.data, host.nbytes, kind, self.stream))
        self._keep = getattr(self, "_keep", []) + [host]  # host memory must live until the copy ran
        return buf

    def _output(self, name: str, shape: tuple) -> DeviceBuffer:
        pool = self._outputs.setdefault(name, [])
        nbytes = int(np.prod(shape, dtype=np.int64)) * numpy_dtype(self.dtypes[name]).itemsize
        pool[:] = [b for b in pool if b.nbytes == nbytes]
        if len(pool) < 2:
            pool.append(DeviceBuffer(shape, self.dtypes[name], self.cudart))
        pool.append(pool.pop(0))  # alternate: the buffer returned last step is being read this step
        buf = pool[-1]
        buf.shape = tuple(shape)
        return buf

    def run(self, feeds: dict) -> dict:
        self._keep = []
        for name, value in feeds.items():
            buf = value if isinstance(value, DeviceBuffer) else self._upload(name, value)
            self.context.set_input_shape(name, buf.shape)
            self.context.set_tensor_address(name, int(buf.ptr))
        outs = {}
        for name in self.output_names:
            outs[name] = self._output(name, tuple(self.context.get_tensor_shape(name)))
            self.context.set_tensor_address(name, int(outs[name].ptr))
        if not self.context.execute_async_v3(int(self.stream)):
            raise BackendUnavailable(f"TensorRT execution of {self.engine.name} failed (see the TensorRT log)")
        result = {}
        for name, buf in outs.items():
            if name in self.resident:
                result[name] = buf
                continue
            host = np.empty(buf.shape, numpy_dtype(buf.dtype))
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(self.cudart.cudaMemcpyAsync(host.ctypes.data, buf.ptr, host.nbytes, kind, self.stream))
            result[name] = host
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return result


def open_trt(engines: dict, contracts: dict, plugin_lib: Path | None) -> dict:
    from qwen_vl_trt.export.trt_compat import import_tensorrt, load_plugin_library

    trt = import_tensorrt()
    if plugin_lib is not None:
        try:
            load_plugin_library(plugin_lib, trt=trt)
        except (FileNotFoundError, RuntimeError) as e:
            raise ArtifactError(str(e)) from None
    cudart = _cudart()
    stream = _check(cudart.cudaStreamCreate())
    return {name: TrtSession(path, contracts[name], trt, cudart, stream, _cache_outputs(contracts[name]))
            for name, path in engines.items()}
