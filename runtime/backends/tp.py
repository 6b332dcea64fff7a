"""Tensor-parallel decoder on ONNX Runtime (CPU): the N rank graphs `decoder.rank{r}.onnx` (export/tp.py) run as
N processes, their `DistCollective` all-reduces done by MPI (mpi4py over the MPICH wheel). The reference of the
tensor-parallel path: what the TensorRT side (NCCL, one context per GPU) must equal.

    trt-run process = rank 0                         spawned rank processes 1..N-1 (idle: sleep-poll, no spinning)
    TpDecoderSession.run(feeds)  --send------->      RankSession.run(feeds of rank r)
      RankSession.run (rank 0)    <-- MPI Allreduce at every DistCollective node -->
      present_* assembled         <--send------      present_* of the rank's KV heads

Why MPI: the issue asks for an existing CPU collective library; the runtime must not import torch (so no gloo
through torch.distributed); mpi4py + the `mpich` wheel install from PyPI without a system MPI, and
`MPI.COMM_SELF.Spawn` starts the rank processes from the trt-run / server process itself (no `mpiexec` launcher in
front of the user's command; MPICH needs its `mpiexec` on PATH for that, which `_mpi` puts there). The all-reduce
is an ONNX Runtime custom op registered through onnxruntime-extensions' Python ops (`PyOp`): ONNX Runtime prefers
a registered kernel over the node's model-local function (the 1-rank Identity body). PyOps live in the domain
`ai.onnx.contrib`, so a rank session loads its graph with the `trt` DistCollective nodes renamed into that domain,
in memory (the weights stay in the `.onnx.data` file, found through the session's external-initializer folder).

The seam is the Session interface (runtime/backends/base.py): `TpDecoderSession` has the whole model's decoder
contract (KV cache [B, Hkv, K, D]); `run` hands rank r the cache heads it holds (`TensorParallel.kv_heads`: a
slice, or the one replicated head when N > Hkv) and puts the ranks' present_* back together, so every front-end
(generate, the in-flight scheduler's slot prefill, the server) runs unchanged on numpy feeds (decode_io.HostIO).
The cost of that simplicity: the KV cache crosses to the ranks each step (numpy, pickled by mpi4py), which is fine
for the CPU reference and what the resident per-rank caches of the TensorRT design (docs/large-models.md) avoid.

Failure: ranks run the same graph on the same shapes, so a bad feed fails on every rank before any collective (no
rank waits forever); feeds are checked against the contract on rank 0 before they are sent. A rank that cannot
load its graph reports one line and the session refuses to open (ArtifactError), after stopping the other ranks.
Only float32 graphs: the custom op is registered for float tensors (ONNX Runtime's CPU provider runs fp32 decoders).
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from qwen_vl_trt.model.contracts import decoder_contract
from qwen_vl_trt.model.errors import ArtifactError, BackendUnavailable
from qwen_vl_trt.model.tp import TensorParallel, rank_spec

from .base import check_io
from .kv_cache import numpy_dtype

COLLECTIVE_DOMAIN = "trt"  # as export/tp.py writes it (not imported: export/ may import torch)
PYOP_DOMAIN = "ai.onnx.contrib"  # where onnxruntime-extensions registers Python custom ops
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
_STEP, _RESULT = 1, 2  # MPI tags: rank 0 -> rank r (a step's feeds, or stop), rank r -> rank 0 (its present_*)
IDLE_POLL_S = 0.0002  # how often an idle rank looks for the next step (adds at most this to a step's latency)
_CACHE = ("past_key.", "past_value.")  # [B, Hkv, K, D] inputs: split by KV head
_comm = None  # the MPI intracommunicator of the ranks now running (rank 0 = the process that runs the scheduler;
# a process may hold several TP sessions, which run one at a time: each sets it before it runs)


def _mpi():
    """mpi4py's MPI module, with MPICH's `mpiexec` on PATH (MPICH's singleton Spawn starts it). A rank waiting in a
    collective busy-polls; MPICH yields the core every POLLS_BEFORE_YIELD polls (default 1000): 1 lets the rank
    that computes run when ranks outnumber cores (the test machine: decode 7.8 -> 10.6 tok/s at TP 2 on 2 busy
    cores). Set before MPI starts; the spawned ranks inherit it."""
    os.environ.setdefault("MPIR_CVAR_POLLS_BEFORE_YIELD", "1")
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise BackendUnavailable(f"tensor-parallel artifacts need MPI on the CPU: pip install mpi4py mpich ({e})") from None
    here = Path(sys.executable).parent
    if not (here / "mpiexec").exists() and shutil.which("mpiexec") is None:
        raise BackendUnavailable("tensor-parallel artifacts need MPICH's mpiexec (pip install mpich)")
    if (here / "mpiexec").exists() and str(here) not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = str(here) + os.pathsep + os.environ.get("PATH", "")
    return MPI


def _register_all_reduce() -> str:
    """Register the DistCollective kernel (all-reduce sum over `_comm`) with onnxruntime-extensions -> the path
    of its custom-op library for SessionOptions.register_custom_ops_library."""
    ocos = _ortx_custom_ops()
    PyCustomOpDef, get_library_path, onnx_op = ocos.PyCustomOpDef, ocos.get_library_path, ocos.Opdef.declare
    if not getattr(_register_all_reduce, "done", False):
        attrs = {"collective_operation": PyCustomOpDef.dt_string, "reduce_op": PyCustomOpDef.dt_string,
                 "root": PyCustomOpDef.dt_int64, "nb_rank": PyCustomOpDef.dt_int64}

        @onnx_op(op_type="DistCollective", inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float],
                 attrs=attrs)
        def dist_collective(x, **kwargs):  # x: any shape, float32; the same shape on every rank
            return all_reduce(x, **kwargs)

        _register_all_reduce.done = True
    return get_library_path()


def _ortx_custom_ops():
    """onnxruntime-extensions' custom-op core (`onnxruntime_extensions._ocos`: Opdef, PyCustomOpDef,
    get_library_path) without running the package's __init__, which imports transformers (and with it torch) for
    its tokenizer converters when they are installed and sets PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python (which
    the rank processes would inherit). The package module is registered unexecuted; `_ocos` needs only its
    compiled `_extensions_pydll` sibling."""
    import importlib
    import importlib.util

    if "onnxruntime_extensions" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime_extensions")
        if spec is None:
            raise BackendUnavailable("tensor-parallel artifacts need onnxruntime-extensions (pip install "
                                     "onnxruntime-extensions)")
        sys.modules["onnxruntime_extensions"] = importlib.util.module_from_spec(spec)  # __path__ set, not executed
    return importlib.import_module("onnxruntime_extensions._ocos")


def all_reduce(x: np.ndarray, collective_operation: str = "all_reduce", reduce_op: str = "sum", nb_rank: int = 0,
               **_) -> np.ndarray:
    """The sum of `x` over the ranks of `_comm` (what IDistCollectiveLayer ALL_REDUCE/SUM computes with NCCL)."""
    MPI = _mpi()
    if collective_operation != "all_reduce" or reduce_op != "sum":
        raise ValueError(f"DistCollective {collective_operation}/{reduce_op}: only all_reduce/sum is implemented")
    if nb_rank != _comm.Get_size():
        raise ValueError(f"DistCollective nb_rank={nb_rank} but {_comm.Get_size()} ranks run")
    out = np.array(x, dtype=np.float32, copy=True)
    _comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
    return out


class RankSession:
    """One rank's decoder graph on ONNX Runtime's CPU provider, its all-reduces bound to the MPI ranks.
    run(feeds) -> every output as numpy (logits [B, V], present_* [B, Hkv_r, K, D])."""

    def __init__(self, manifest, rank: int, threads: int = 0):
        import onnx
        import onnxruntime as ort

        from .ort import int4_accuracy

        tp = TensorParallel(rank, manifest.tp)
        path = manifest.rank_paths()[rank]
        self.contract = decoder_contract(rank_spec(manifest.spec, tp)).resolve(manifest.dtype)
        model = onnx.load(str(path), load_external_data=False)
        for node in model.graph.node:  # the all-reduces run the registered kernel, not the Identity body
            if node.domain == COLLECTIVE_DOMAIN and node.op_type == "DistCollective":
                node.domain = PYOP_DOMAIN
        model.opset_import.append(onnx.helper.make_opsetid(PYOP_DOMAIN, 1))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.register_custom_ops_library(_register_all_reduce())
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # ranks share the cores
        int4_accuracy(opts, manifest.weight_formats().accuracy_level)  # INT4 ranks: the 1-rank session's MatMulNBits
        opts.intra_op_num_threads = threads or max(1, (os.cpu_count() or 1) // manifest.tp)
        try:
            self.sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{path}: onnxruntime cannot load it ({msg}); re-run export_all.sh") from None
        found_in = {i.name: (_ORT_TYPES.get(i.type, i.type), len(i.shape)) for i in self.sess.get_inputs()}
        found_out = {o.name: (_ORT_TYPES.get(o.type, o.type), len(o.shape)) for o in self.sess.get_outputs()}
        check_io(self.contract, found_in, found_out, str(path))
        if any(d == "bfloat16" or d == "float16" for d, _ in found_in.values()):
            raise BackendUnavailable(f"{path}: tensor-parallel ranks run on ONNX Runtime's CPU provider in fp32 only; "
                                     "re-export with --dtype fp32")
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: dict) -> dict:
        return dict(zip(self.output_names, self.sess.run(None, feeds)))


class TpDecoderSession:
    """A Session (runtime/backends/base.py) of the whole decoder over `manifest.tp` rank processes (module doc)."""

    device, provider, resident = "cpu", "CPUExecutionProvider+MPI", frozenset()
    graph_capture, graph_capture_error = False, None

    def __init__(self, manifest, threads: int = 0):
        global _comm
        MPI = _mpi()
        self.manifest, self.size = manifest, manifest.tp
        self.contract = manifest.contracts["decoder"]
        t = manifest.spec.text
        self.kv = [TensorParallel(r, self.size).kv_heads(t.num_key_value_heads) for r in range(self.size)]
        self.owner = [self.kv.index(span) for span in sorted(set(self.kv))]  # first rank holding each head span
        args = ["-m", "qwen_vl_trt.runtime.backends.tp", str(manifest.directory), str(threads)]
        self._inter = MPI.COMM_SELF.Spawn(sys.executable, args=args, maxprocs=self.size - 1)
        self.comm = _comm = self._inter.Merge(high=False)
        self.closed = False
        atexit.register(self.close)
        errors = []
        try:
            self.rank0 = RankSession(manifest, 0, threads)
        except Exception as e:  # reported after the other ranks said how they did, then raised
            errors.append(e)
        status = self.comm.gather(None, root=0)
        errors += [ArtifactError(s) for s in status[1:] if s]
        if errors:
            self.close()
            raise errors[0]

    def run(self, feeds: dict, device_outputs=()) -> dict:
        """The whole decoder's feeds (past_* [B, Hkv, K, D]) -> logits [B, V] and present_* [B, Hkv, K, D]."""
        feeds = {k: _host(v) for k, v in feeds.items()}
        self._check(feeds)
        cache = [k for k in feeds if k.startswith(_CACHE)]
        common = {k: v for k, v in feeds.items() if k not in cache}
        per_rank = [{**common, **{k: np.ascontiguousarray(feeds[k][:, lo:hi]) for k in cache}} for lo, hi in self.kv]
        global _comm
        _comm = self.comm  # the all-reduce kernel reduces over the communicator of the session that runs
        self._send([("run", f) for f in per_rank[1:]])
        try:
            out = self.rank0.run(per_rank[0])
        finally:  # the ranks answer every run: stay in step with them even when rank 0 failed
            presents = [None] + [self.comm.recv(source=r, tag=_RESULT) for r in range(1, self.size)]
        failed = [p for p in presents[1:] if isinstance(p, str)]
        if failed:
            raise RuntimeError(f"tensor-parallel rank failed: {failed[0]}")
        presents[0] = out
        merged = {"logits": out["logits"]}
        for name in out:
            if name.startswith("present_"):
                merged[name] = np.concatenate([presents[r][name] for r in self.owner], axis=1)
        return merged

    def _check(self, feeds: dict) -> None:
        """Names, dtypes and ranks of `feeds` against the decoder contract (on rank 0, before any rank runs)."""
        expected = {t.name: (t.dtype, len(t.dims)) for t in self.contract.inputs}
        found = {k: (str(v.dtype), v.ndim) for k, v in feeds.items()}
        if found != expected:
            wrong = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            raise ValueError(f"tensor-parallel decoder feeds differ from the decoder contract at {', '.join(wrong[:3])}")

    def _send(self, messages: list) -> None:
        """messages[r - 1] to rank r, all at once (the ranks wait for them without spinning: `serve_rank`)."""
        requests = [self.comm.isend(m, dest=r, tag=_STEP) for r, m in enumerate(messages, start=1)]
        for request in requests:
            request.wait()

    def allocate(self, shape: tuple, dtype: str):
        return np.zeros(shape, numpy_dtype(dtype))

    def decode_io(self, model, batch: int, cache_len: int):
        from .decode_io import HostIO

        return HostIO(model, batch, cache_len)

    def close(self) -> None:
        """Stop the rank processes (also at interpreter exit)."""
        if self.closed:
            return
        self.closed = True
        self._send([("stop", None)] * (self.size - 1))
        self.comm.Disconnect()
        self._inter.Disconnect()


def _host(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def serve_rank(directory: str, threads: int) -> None:
    """A spawned rank: load its graph, report, then run what rank 0 scatters until told to stop."""
    global _comm
    from mpi4py import MPI

    from qwen_vl_trt.model.manifest import load_manifest

    parent = MPI.Comm.Get_parent()
    _comm = parent.Merge(high=True)
    sess = None
    try:
        sess = RankSession(load_manifest(directory), _comm.Get_rank(), threads)
        _comm.gather(None, root=0)
    except Exception as e:  # one line back to rank 0, which refuses to open the session
        _comm.gather(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, root=0)
    while True:
        while not _comm.Iprobe(source=0, tag=_STEP):  # idle between steps: sleep, not MPI's busy polling
            time.sleep(IDLE_POLL_S)
        op, feeds = _comm.recv(source=0, tag=_STEP)
        if op != "run":
            break
        try:
            out = {k: v for k, v in sess.run(feeds).items() if k.startswith("present_")}
        except Exception as e:  # one line back to rank 0 (the same feeds fail on every rank, before any collective)
            out = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _comm.send(out, dest=0, tag=_RESULT)
    _comm.Disconnect()
    parent.Disconnect()


if __name__ == "__main__":
    serve_rank(sys.argv[1], int(sys.argv[2]))
