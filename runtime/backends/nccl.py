"""NCCL for the TensorRT tensor-parallel runtime, without torch: the `nvidia-nccl-cu13` wheel's libnccl.so.2 through
ctypes (the wheel ships the library only; its C API is stable: nccl.h).

- `Nccl()`: the library, found in the wheel (or the system's libnccl.so.2); `version()` -> "2.30.7".
- `comm_init_all(devices)` -> one communicator handle per device, for one process driving all of them
  (`ncclCommInitAll`, the Triton tensorrt_backend multi-device pattern); `destroy(comms)`.
- `set_communicators(contexts, comms)`: `IExecutionContext.set_communicator(comm_r)` on every rank's context at
  once, one thread per rank: TensorRT documents the call as collective (it blocks until every rank sharing the
  communicator has made it), so calling them one after another would never return. The binding takes the
  ncclComm_t as a PyCapsule (`communicator: CapsuleType` in the tensorrt_rtx 1.7.1 bindings): `comm_capsule`.

What runs where: the library loads and reports its version on any machine (tests/test_tp.py); creating a
communicator needs one CUDA GPU per rank (on the CI machine NCCL answers "CUDA driver version is insufficient",
turned into one BackendUnavailable line). The TensorRT session that would use these (N engines decoder.rank{r},
N contexts, N KV caches) is runtime/backends/trt_tp.py.
"""
from __future__ import annotations

import ctypes
import importlib.util
import threading
from pathlib import Path

from qwen_vl_trt.model.errors import BackendUnavailable


def library_path() -> str:
    """libnccl.so.2 of the nvidia-nccl wheel (site-packages/nvidia/nccl/lib), else the loader's own search."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []):
        lib = Path(root) / "nccl" / "lib" / "libnccl.so.2"
        if lib.is_file():
            return str(lib)
    return "libnccl.so.2"


class Nccl:
    def __init__(self, path: str | None = None):
        path = path or library_path()
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise BackendUnavailable(f"NCCL is not installed ({e}); pip install nvidia-nccl-cu13") from None
        self.lib.ncclGetErrorString.restype = ctypes.c_char_p
        self.lib.ncclGetLastError.restype = ctypes.c_char_p

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            detail = (self.lib.ncclGetLastError(None) or b"").decode(errors="replace")
            raise BackendUnavailable(f"{what}: {self.lib.ncclGetErrorString(result).decode()}"
                                     + (f" ({detail})" if detail else ""))

    def version(self) -> str:
        """"MAJOR.MINOR.PATCH" of the loaded library (NCCL_VERSION_CODE = major*10000 + minor*100 + patch)."""
        code = ctypes.c_int()
        self._check(self.lib.ncclGetVersion(ctypes.byref(code)), "ncclGetVersion")
        return f"{code.value // 10000}.{code.value // 100 % 100}.{code.value % 100}"

    def comm_init_all(self, devices: list[int]) -> list[int]:
        """One communicator (an ncclComm_t, as an int) per CUDA device in `devices`: rank r is devices[r]."""
        comms = (ctypes.c_void_p * len(devices))()
        devlist = (ctypes.c_int * len(devices))(*devices)
        self._check(self.lib.ncclCommInitAll(comms, len(devices), devlist),
                    f"ncclCommInitAll over devices {list(devices)}")
        return [int(c) for c in comms]

    def destroy(self, comms: list[int]) -> None:
        for c in comms:
            self._check(self.lib.ncclCommDestroy(ctypes.c_void_p(c)), "ncclCommDestroy")


def comm_capsule(comm: int):
    """A PyCapsule holding the ncclComm_t `comm` (unnamed, no destructor: the communicator stays owned by
    `Nccl.destroy`), what `IExecutionContext.set_communicator` takes."""
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.c_void_p(comm), None, None)


def set_communicators(contexts: list, comms: list[int], timeout_s: float = 120.0) -> None:
    """contexts[r].set_communicator(comms[r]) for every rank, concurrently (a collective call); raises when one
    returns False or the ranks do not all return within `timeout_s`."""
    if len(contexts) != len(comms):
        raise ValueError(f"{len(contexts)} contexts but {len(comms)} communicators")
    results: list = [None] * len(contexts)

    def call(r: int) -> None:
        try:
            results[r] = bool(contexts[r].set_communicator(comm_capsule(comms[r])))
        except Exception as e:  # reported below, per rank
            results[r] = e

    threads = [threading.Thread(target=call, args=(r,), daemon=True) for r in range(len(contexts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    failed = [r for r, ok in enumerate(results) if ok is not True]
    if failed:
        why = results[failed[0]]
        raise BackendUnavailable(f"setCommunicator failed on rank {failed[0]}"
                                 + (f": {why}" if isinstance(why, Exception) else " (returned False or timed out)"))
