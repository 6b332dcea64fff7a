"""A fake TensorRT module and a fake CUDA runtime for runtime/backends/trt.py (tests only).

`FakeCuda` simulates device memory (bytearrays at fake addresses), pinned host memory (real numpy memory),
async copies and memsets, and stream capture: while a stream is capturing, every copy and every engine
execution is recorded instead of run, and `cudaGraphLaunch` runs the recording. An engine execution bakes the
addresses and shapes it was enqueued with, as a captured kernel does, so replaying a graph after the bindings
moved would read the old buffers -- exactly the bug class the graph cache must avoid.

`fake_trt(engines, cuda)` returns a module-like object with what TrtSession uses: Logger, Runtime,
TensorIOMode, DataType; `engines` maps engine bytes to `FakeEngine(contract, ranges, compute)`, where
`compute(inputs: dict[name, np.ndarray], outputs: dict[name, np.ndarray])` writes the outputs in place (views
of the fake device memory).
"""
from __future__ import annotations

import ctypes
import threading
import types

import numpy as np

from qwen_vl_trt.runtime.backends.kv_cache import numpy_dtype


class FakeCuda:
    class cudaMemcpyKind:  # noqa: N801 -- cuda-python's names
        cudaMemcpyHostToDevice = "H2D"
        cudaMemcpyDeviceToHost = "D2H"

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeGlobal = "global"

    cudaEventDisableTiming = 2  # noqa: N815

    def __init__(self, devices: int = 1):
        self.devices = devices
        self.current = threading.local()  # CUDA's current device is per host thread
        self.where: dict[int, int] = {}  # allocation -> device
        self.streams: dict[int, int] = {7: 0}  # stream -> device (7: the single-GPU tests' stream)
        self.mem: dict[int, bytearray] = {}
        self.pinned: dict[int, np.ndarray] = {}
        self.next = 1 << 40  # fake device addresses, far from host ones
        self.capturing: list | None = None
        self.fail_capture = False
        self.log: list[tuple] = []  # ("H2D"|"D2H"|"memset"|"exec"|"launch"|"capture"|"malloc", detail)

    # ---- devices ------------------------------------------------------------------------------------------
    def cudaGetDeviceCount(self):
        return 0, self.devices

    def cudaSetDevice(self, device):
        assert 0 <= device < self.devices, f"cudaSetDevice({device}) with {self.devices} devices"
        self.current.device = device
        return (0,)

    def device_now(self) -> int:
        return getattr(self.current, "device", 0)

    def device_of(self, ptr: int) -> int:
        for base, buf in self.mem.items():
            if base <= ptr < base + max(len(buf), 1):
                return self.where[base]
        raise AssertionError(f"no device allocation holds {ptr:#x}")

    def _on_stream(self, stream, *ptrs) -> None:
        """CUDA work on `stream` must be issued with its device current, on memory of that device."""
        dev = self.streams[stream]
        assert self.device_now() == dev, f"stream {stream} of device {dev} used with device {self.device_now()} current"
        for p in ptrs:
            assert self.device_of(p) == dev, f"{p:#x} is on device {self.device_of(p)}, the stream on {dev}"

    # ---- memory ---------------------------------------------------------------------------------------------
    def cudaMalloc(self, n):
        ptr, self.next = self.next, self.next + ((n + 255) // 256 + 1) * 256
        self.mem[ptr] = bytearray(n)
        self.where[ptr] = self.device_now()
        self.log.append(("malloc", n))
        return 0, ptr

    def cudaFree(self, ptr):
        self.mem.pop(ptr, None)
        return (0,)

    def cudaMallocHost(self, n):
        buf = np.zeros(n, np.uint8)
        self.pinned[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def cudaFreeHost(self, ptr):
        self.pinned.pop(ptr, None)
        return (0,)

    def device(self, ptr: int, nbytes: int) -> memoryview:
        for base, buf in self.mem.items():
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return memoryview(buf)[ptr - base:ptr - base + nbytes]
        raise AssertionError(f"no device allocation holds [{ptr:#x}, +{nbytes})")

    def array(self, ptr: int, shape, dtype: str) -> np.ndarray:
        dt = numpy_dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        return np.frombuffer(self.device(ptr, n), dt).reshape(shape) if n else np.zeros(shape, dt)

    # ---- stream work --------------------------------------------------------------------------------------
    def submit(self, kind: str, detail, fn) -> None:
        if self.capturing is not None:
            self.capturing.append((kind, detail, fn))
        else:
            self.log.append((kind, detail))
            fn()

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        self._on_stream(stream, dst if kind == "H2D" else src)

        def copy():
            if kind == "H2D":
                self.device(dst, n)[:] = ctypes.string_at(src, n)
            else:
                ctypes.memmove(dst, bytes(self.device(src, n)), n)
        self.submit(kind, n, copy)
        return (0,)

    def cudaMemcpyPeerAsync(self, dst, dst_device, src, src_device, n, stream):
        assert self.device_of(dst) == dst_device and self.device_of(src) == src_device
        self._on_stream(stream, src)

        def copy():
            self.device(dst, n)[:] = bytes(self.device(src, n))
        self.submit("peer", (src_device, dst_device, n), copy)
        return (0,)

    def cudaEventCreateWithFlags(self, flags):
        return 0, ("event", self.device_now())

    def cudaEventRecord(self, event, stream):
        self._on_stream(stream)
        self.log.append(("record", stream))
        return (0,)

    def cudaStreamWaitEvent(self, stream, event, flags):
        self._on_stream(stream)
        self.log.append(("wait", stream))
        return (0,)

    def cudaMemsetAsync(self, ptr, value, n, stream):
        self._on_stream(stream, ptr)

        def fill():
            self.device(ptr, n)[:] = bytes([value]) * n
        self.submit("memset", n, fill)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        assert self.capturing is None, "synchronize inside a capture is illegal"
        self.log.append(("sync", stream))
        return (0,)

    def cudaStreamCreate(self):
        stream = 100 + len(self.streams)
        self.streams[stream] = self.device_now()
        return 0, stream

    def cudaStreamBeginCapture(self, stream, mode):
        assert self.capturing is None
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        if self.fail_capture:
            return 901, None  # cudaErrorStreamCaptureInvalidated
        self.log.append(("capture", len(graph)))
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, tuple(graph)

    def cudaGraphLaunch(self, exec_, stream):
        self.log.append(("launch", len(exec_)))
        for kind, detail, fn in exec_:
            fn()
        return (0,)

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaGraphExecDestroy(self, exec_):
        return (0,)


class FakeEngine:
    def __init__(self, contract, ranges: dict, compute, profile_override: dict | None = None, name: str | None = None):
        self.contract, self.ranges, self.compute = contract, ranges, compute
        self.specs = {t.name: t for t in (*contract.inputs, *contract.outputs)}
        self.inputs = {t.name for t in contract.inputs}
        self.profile_override = profile_override or {}
        self.name = name or contract.name

    # what TrtSession reads
    @property
    def num_io_tensors(self):
        return len(self.specs)

    def get_tensor_name(self, i):
        return list(self.specs)[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name):
        return self.specs[name].dtype

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self.specs[name].dims)

    def get_tensor_profile_shape(self, name, profile):
        if name in self.profile_override:
            return self.profile_override[name]
        dims = self.specs[name].dims
        return tuple(tuple(d if isinstance(d, int) else self.ranges[d][k] for d in dims) for k in range(3))

    def create_execution_context(self):
        return FakeContext(self)


def capsule_pointer(capsule) -> int:
    """The pointer a PyCapsule holds (what a communicator capsule carries)."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return int(get(capsule, None) or 0)


class FakeContext:
    cuda: FakeCuda  # set by fake_trt

    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self.device = self.cuda.device_now()  # the device current when the context was made
        self.communicator = None

    def set_communicator(self, capsule):
        self.communicator = capsule_pointer(capsule)
        self.cuda.log.append(("communicator", (self.engine.name, self.communicator)))
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name in self.engine.inputs:
            return self.shapes[name]
        dims = {}
        for n in self.engine.inputs:
            for d, v in zip(self.engine.specs[n].dims, self.shapes[n]):
                dims[d] = v
        return tuple(d if isinstance(d, int) else dims[d] for d in self.engine.specs[name].dims)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream):
        if self.cuda.capturing is not None and self.cuda.fail_capture:
            return False
        assert self.cuda.device_now() == self.device, f"{self.engine.name} enqueued with another device current"
        self.cuda._on_stream(stream, *(self.addresses[n] for n in self.engine.specs))
        # bake what this enqueue sees, as a captured kernel does
        baked = {n: (self.addresses[n], self.get_tensor_shape(n), self.engine.specs[n].dtype) for n in self.engine.specs}

        def kernel():
            arrays = {n: self.cuda.array(p, s, dt) for n, (p, s, dt) in baked.items()}
            ins = {n: a.copy() for n, a in arrays.items() if n in self.engine.inputs}  # read before any write
            self.engine.compute(ins, {n: a for n, a in arrays.items() if n not in self.engine.inputs})
        self.cuda.submit("exec", self.engine.name, kernel)
        return True


def fake_trt(engines: dict, cuda: FakeCuda):
    FakeContext.cuda = cuda

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return engines.get(bytes(blob))

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    dtypes = types.SimpleNamespace(FLOAT="float32", INT64="int64", INT32="int32", BF16="bfloat16", HALF="float16",
                                   BOOL="bool", INT8="int8")
    return types.SimpleNamespace(Runtime=Runtime, Logger=Logger, DataType=dtypes, __version__="fake",
                                 TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
                                 LayerType=types.SimpleNamespace(DIST_COLLECTIVE="DIST_COLLECTIVE"))
