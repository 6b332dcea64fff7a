"""The ONNX Runtime backend: `OrtSession`, a Session of runtime/backends/base.py. The only module (with
ort_io.py and device_sampling.py) that calls onnxruntime.

At load the session discovers its I/O (`get_inputs/get_outputs`) and checks names, dtypes and ranks against the
manifest's GraphSpec (`base.check_io`). I/O binding with OrtValues by default (the KV cache lives on the EP's
device); `io_binding=False` gives plain numpy feeds on the CPU EP. On the CUDA EP (onnxruntime-gpu) the decoder
session is created with `enable_cuda_graph` (`cuda_provider_options`) and replays its decode step. The binding
logic runs on the CPU EP in the tests; CUDA graph capture itself only on a GPU. The decode step does not go
through `run`: `decode_io()` gives the IO object that binds it once (ort_io.OrtBoundIO; decode_io.HostIO
without I/O binding).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qwen_vl_trt.model.errors import ArtifactError, BackendUnavailable, UserError

from . import ort_f32_kernel, ort_int4_kernel
from .base import check_io
from .prepack_order import ORDER, reordered
from .cuda import check as _check
from .cuda import cudart as _cudart
from .kv_cache import numpy_dtype

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


class OrtSession:
    """onnxruntime InferenceSession; `io_binding` keeps `resident` outputs as OrtValues on the EP's device.

    `graph_capture` (the decoder on the CUDA EP): the session is created with `enable_cuda_graph`, so a run whose
    RunOptions carry `gpu_graph_id` N > 0 is captured once and then replayed (runtime/backends/ort_io.py binds every
    input and output of such a run once, at fixed addresses and shapes, as ONNX Runtime requires). ONNX Runtime
    refuses the option for a graph with control flow (the MoE experts' Loop) or with nodes that need copies
    between devices; the session is then made without it and `graph_capture_error` says why.
    """

    def __init__(self, path: Path, contract, *, providers=("CPUExecutionProvider",), io_binding: bool = True,
                 resident=(), threads: int = 0, graph_capture: bool = False, int4_accuracy_level: int = 1,
                 mapped: bool = False, cache_dir: Path | None = None, prepack_order: bool = False,
                 int4_kernel: Path | None = None, f32_kernel: Path | None = None):
        import onnxruntime as ort

        self.ort = ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        int4_accuracy(opts, int4_accuracy_level)
        if mapped and list(providers) == ["CPUExecutionProvider"]:
            weights_mapped(opts)
        if threads:
            opts.intra_op_num_threads = threads
        self.graph_capture, self.graph_capture_error, self._graph_ids = False, None, 0
        self.kv_in_place = False  # set by open_ort for decoder.ort.onnx
        self.cache_hit = None  # with a cache_dir: whether the optimized model came from the cache
        # qwen_vl::MatMulInt4 (runtime/backends/ort_int4_kernel.py): the INT4 products of the cached optimized model
        cpu_only = list(providers) == ["CPUExecutionProvider"]
        self.int4_kernel = int4_kernel if int4_kernel is not None and cache_dir is not None and cpu_only else None
        if self.int4_kernel is not None:
            opts.register_custom_ops_library(str(self.int4_kernel))
        # qwen_vl::MatMulF32 (runtime/backends/ort_f32_kernel.py): a dense decoder's products on its mapped weights
        self.f32_kernel = f32_kernel if f32_kernel is not None and cache_dir is not None and cpu_only else None
        if self.f32_kernel is not None:
            opts.register_custom_ops_library(str(self.f32_kernel))
            weights_mapped(opts)
        try:
            if self.f32_kernel is not None:
                self.sess = self._create_from_graph(Path(path), opts, providers, cache_dir, ort_f32_kernel.VERSION,
                                                    ort_f32_kernel.renamed)
            elif prepack_order and cache_dir is not None and not mapped:
                self.sess = self._create_from_graph(Path(path), opts, providers, cache_dir, ORDER, reordered)
            else:
                self.sess = self._create_cached(Path(path), opts, providers, graph_capture, cache_dir)
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
        self.provider = self.sess.get_providers()[0]
        self.device = "cuda" if "CUDAExecutionProvider" in self.sess.get_providers() else "cpu"
        # bf16 has no numpy type in onnxruntime's Python API: only bound OrtValues carry it
        has_bf16 = any(d == "bfloat16" for d, _ in (*found_in.values(), *found_out.values()))
        self.io_binding = io_binding or has_bf16 or self.device == "cuda"
        self.resident = frozenset(resident) if self.io_binding else frozenset()

    def warm_up(self) -> None:
        """One run on zeros: every symbolic dimension 1, `cache_len` 16 (the decoder's inputs: zero embeddings at
        position 0 with an empty cache). A decoder on MatMulF32 or MatMulInt4 reads its weights where ONNX Runtime
        has mapped them (nothing is prepacked) and nothing has touched them yet, so the first request would take the
        page faults of all of them (the benchmark's 2.86 GB fp32 decoder: its first prefill 1103 ms against 735 ms
        for the second, bench/first_request_profile.py, docs/benchmarks.md); this run takes them at start-up
        instead, on the session's own thread, while the other sessions are created."""
        feeds = {}
        for i in self.sess.get_inputs():
            dims = [d if isinstance(d, int) else 16 if d == "cache_len" else 1 for d in i.shape]
            feeds[i.name] = np.zeros(dims, np.int64 if i.type == "tensor(int64)" else np.float32)
        self.sess.run(None, feeds)

    def decode_io(self, model, batch: int, cache_len: int):
        """The decode IO of this (decoder) session: bound once with I/O binding (ort_io.py), else host feeds."""
        if not self.io_binding:
            from .decode_io import HostIO

            return HostIO(model, batch, cache_len)
        from .ort_io import OrtBoundIO

        return OrtBoundIO(model, batch, cache_len)

    def _create_cached(self, path: Path, opts, providers, graph_capture: bool, cache_dir: Path | None):
        """`_create`, through the optimized-model cache of runtime/backends/ort_cache.py when `cache_dir` is set:
        a hit loads the cached optimized model; a miss optimizes the graph and writes the entry as it loads."""
        if cache_dir is None:
            return self._create(path, opts, providers, graph_capture)
        from . import ort_cache

        config = session_config(opts)
        if self.int4_kernel is not None:
            config[_INT4_KERNEL_KEY] = ort_int4_kernel.VERSION
        try:
            load, tmp = ort_cache.cached_model(cache_dir, path, providers, config, self.ort.__version__)
        except OSError:  # a cache folder that cannot be made (read-only, full): run without the cache
            return self._create(path, opts, providers, graph_capture)
        renamed_now = False  # a miss with int4_kernel: the entry is written (renamed) first, then loaded like a hit
        if tmp is not None and self.int4_kernel is not None:
            try:
                self._write_renamed_entry(path, tmp, config)
            except Exception:  # the graph's own error, if it has one, comes from loading it as exported
                ort_cache.discard(tmp)
                return self._create(path, opts, providers, graph_capture)
            ort_cache.commit(tmp, cache_dir, path, providers, config, self.ort.__version__)
            load, tmp = ort_cache.cached_model(cache_dir, path, providers, config, self.ort.__version__)
            if tmp is not None:  # the entry could not be renamed into place: the graph as exported
                ort_cache.discard(tmp)
                return self._create(path, opts, providers, graph_capture)
            renamed_now = True
        if tmp is not None:
            ort_cache.save_options(opts, tmp, self.ort)
        try:
            sess = self._create(load, opts, providers, graph_capture)
        except Exception:
            if tmp is None:  # a damaged entry: the graph as exported (its own error, if it has one)
                return self._create(path, opts, providers, graph_capture)
            ort_cache.discard(tmp)  # the graph itself may load: writing the entry is what failed (e.g. disk full)
            opts.optimized_model_filepath = ""
            opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return self._create(path, opts, providers, graph_capture)
        if tmp is not None:
            ort_cache.commit(tmp, cache_dir, path, providers, config, self.ort.__version__)
        self.cache_hit = tmp is None and not renamed_now
        return sess

    def _write_renamed_entry(self, path: Path, tmp: Path, config: dict) -> None:
        """Write the optimized model of `path` into tmp with a session that only optimizes (no prepacking: it never
        runs), then rename its MatMulNBits nodes to qwen_vl::MatMulInt4 (runtime/backends/ort_int4_kernel.py)."""
        from . import ort_cache

        writer = self.ort.SessionOptions()
        writer.log_severity_level = 3
        for key, value in config.items():
            if key != _INT4_KERNEL_KEY:
                writer.add_session_config_entry(key, value)
        writer.add_session_config_entry("session.disable_prepacking", "1")
        ort_cache.save_options(writer, tmp, self.ort)
        self.ort.InferenceSession(str(path), writer, providers=["CPUExecutionProvider"])
        ort_int4_kernel.rewrite_saved_model(tmp / ort_cache.MODEL)

    def _create_from_graph(self, path: Path, opts, providers, cache_dir: Path, what: dict, make):
        """The session of `make(path)`, a graph protobuf without weights kept in the cache (ort_cache.cached_graph;
        `what` names it in the key): prepack_order.reordered (the node of the largest weight first, so that ONNX
        Runtime prepacks it first: a lower peak RSS) or ort_f32_kernel.renamed. Loaded from memory on the weights
        of the graph's folder; the graph as exported where that cannot be done."""
        from .ort_cache import cached_graph, graph_files

        if any(p.is_symlink() for p in graph_files(path)):  # ONNX Runtime refuses in-memory graphs' weights that
            self.f32_kernel = None                             # resolve outside their folder: the graph as exported
            return self._create(path, opts, providers, False)
        blob, self.cache_hit = cached_graph(cache_dir, path, providers, session_config(opts), self.ort.__version__,
                                            what, make)
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        try:
            return self._create(blob, opts, providers, False)
        except Exception:  # a damaged entry, or weights ONNX Runtime refuses to read from memory (e.g. a .onnx.data
            self.cache_hit = None  # symlinked from elsewhere): the graph as exported (its own error, if it has one)
            self.f32_kernel = None  # no MatMulF32 node then (its weights stay mapped: no prepacking was asked for)
            return self._create(path, opts, providers, False)

    def _create(self, path, opts, providers, graph_capture: bool):
        cuda = "CUDAExecutionProvider" in providers
        with_options = lambda graph: [(p, cuda_provider_options(graph)) if p == "CUDAExecutionProvider" else p  # noqa: E731
                                      for p in providers]
        if graph_capture and cuda:
            try:
                sess = self.ort.InferenceSession(str(path), opts, providers=with_options(True))
                # ONNX Runtime falls back to the CPU provider when the CUDA one cannot load: no graph there
                self.graph_capture = sess.get_providers()[0] == "CUDAExecutionProvider"
                if not self.graph_capture:
                    self.graph_capture_error = f"the CUDA provider did not load ({sess.get_providers()[0]} runs)"
                return sess
            except Exception as e:  # e.g. "... cannot use the CUDA Graph feature ... control flow nodes"
                self.graph_capture_error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        model = path if isinstance(path, bytes) else str(path)
        return self.ort.InferenceSession(model, opts, providers=with_options(False))

    def allocate(self, shape: tuple, dtype: str):
        """A zeroed buffer on the EP's device (an OrtValue; numpy without I/O binding)."""
        zeros = np.zeros(shape, numpy_dtype(dtype))
        if not self.io_binding:
            return zeros
        if dtype != "bfloat16":
            return self.ort.OrtValue.ortvalue_from_numpy(zeros, self.device, 0)
        value = self.ort.OrtValue.ortvalue_from_shape_and_type(shape, _ONNX_BF16, self.device, 0)
        value.update_inplace(zeros.view(np.uint16))  # all-zero bits == bf16 zeros
        return value

    def zero(self, value) -> None:
        """Zero a buffer from `allocate` in place (same address): a device memset when cuda-python is there,
        else a copy of host zeros."""
        if isinstance(value, np.ndarray):
            value[...] = 0
            return
        kind = value.data_type()
        host = np.zeros(value.shape(), np.uint16 if kind == "tensor(bfloat16)" else numpy_dtype(_ORT_TYPES[kind]))
        if self.device == "cuda" and host.size:
            try:
                cudart = _cudart()
            except ImportError:
                cudart = None
            if cudart is not None:  # the memset runs on the legacy stream: wait for it before the next run
                _check(cudart.cudaMemset(value.data_ptr(), 0, host.nbytes))
                _check(cudart.cudaDeviceSynchronize())
                return
        value.update_inplace(host)

    def new_graph_id(self) -> int | None:
        """A fresh CUDA graph id (ids are never reused: a captured graph keeps the addresses it was captured
        with), or None without graph capture."""
        if not self.graph_capture:
            return None
        self._graph_ids += 1
        return self._graph_ids

    def run_options(self, graph_id: int | None):
        """RunOptions for a run that replays graph `graph_id`, or that must not capture (None) when the session
        captures graphs; None when it does not."""
        if not self.graph_capture:
            return None
        ro = self.ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", str(graph_id if graph_id is not None else -1))
        return ro

    def _ortvalue(self, value: np.ndarray):
        """numpy -> CPU OrtValue; ml_dtypes bfloat16 goes in as its uint16 bits tagged BFLOAT16."""
        value = np.ascontiguousarray(value)
        if value.dtype == numpy_dtype("bfloat16"):
            return self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value.view(np.uint16), _ONNX_BF16)
        return self.ort.OrtValue.ortvalue_from_numpy(value)

    def bind(self, inputs: dict, outputs: dict, device_outputs=()):
        """An IOBinding with `inputs` (OrtValues as they are, numpy copied to OrtValues) and `outputs` bound to
        the given OrtValues; other outputs are allocated by ONNX Runtime, on the device for `device_outputs`
        and the resident ones, else on the host."""
        binding = self.sess.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value if isinstance(value, self.ort.OrtValue) else self._ortvalue(value))
        for name in self.output_names:
            if name in outputs:
                binding.bind_ortvalue_output(name, outputs[name])
            else:
                on_device = name in self.resident or name in device_outputs
                binding.bind_output(name, self.device if on_device else "cpu", 0)
        return binding

    def run(self, feeds: dict, device_outputs=()) -> dict:
        """feeds -> outputs: numpy, except `resident` and `device_outputs` names, which stay OrtValues on the
        EP's device (only with I/O binding)."""
        if not self.io_binding:
            return dict(zip(self.output_names, self.sess.run(None, feeds)))
        binding = self.bind(feeds, {}, device_outputs)
        self.sess.run_with_iobinding(binding, self.run_options(None))
        keep = self.resident | set(device_outputs)
        return {name: (v if name in keep else _to_numpy(v))
                for name, v in zip(self.output_names, binding.get_outputs())}


_ONNX_BF16 = 16  # onnx.TensorProto.BFLOAT16


def int4_accuracy(opts, level: int = 1) -> None:
    """INT4 weight-only graphs (export/int4.py): ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits, by
    default at accuracy level 4 (activations rounded to int8, ~1e-2 relative error on these models); level 1
    keeps them fp32, so the product is exactly x @ (q * s) up to summation order. The level comes from manifest.json
    (`graphs.decoder.weights.int4_activations`: fp32 -> 1, int8 -> 4; model/weight_formats.py), or trt-run's
    `--int4-activations`. No effect on other graphs. (It replaces the QWEN_VL_INT4_ACCURACY_LEVEL variable, which is
    no longer read.)"""
    if level not in (0, 1, 2, 3, 4):
        raise UserError(f"MatMulNBits accuracy level {level!r}: use 0-4")
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))


def exact_int4_matmul(opts) -> None:
    """Accuracy level 1 (`int4_accuracy`): the reference sessions of the tests and the parity tool."""
    int4_accuracy(opts, 1)


def weights_mapped(opts) -> None:
    """Run on the weights as ONNX Runtime memory-maps them from the `.onnx.data` file: no prepacking. ONNX Runtime
    maps external initializers and, by default, then copies each MatMul / Gemm weight into MLAS's packed layout
    (all weights read and copied at start-up, a second copy's worth of anonymous memory at its peak). Without
    prepacking a session opens on untouched pages (the 2.86 GB decoder of docs/benchmarks.md: 0.3 s against 17.6 s,
    busy machine), the weights stay in the page cache (shared between processes, never copied) and the steps read
    them in place; whether decode is as fast as on the packed layout is what bench/bench_cpu_peers.py's
    `ours-fp32` vs `ours-fp32-prepack` measures. Only for dense graphs on the CPU provider: MatMulNBits (INT4)
    is ~10x slower without its prepacked blocks (loader.open_sessions decides)."""
    opts.add_session_config_entry("session.disable_prepacking", "1")


_CACHE_KEYS = ("session.qdq_matmulnbits_accuracy_level", "session.disable_prepacking")
_INT4_KERNEL_KEY = "qwen_vl.int4_kernel"  # the cache key's part for an entry whose INT4 products are MatMulInt4


def session_config(opts) -> dict:
    """The session config entries that change what ONNX Runtime's optimizer writes (the cache key's part)."""
    out = {}
    for key in _CACHE_KEYS:
        try:
            value = opts.get_session_config_entry(key)
        except Exception:  # onnxruntime raises when the entry is not set
            continue
        if value:
            out[key] = value
    return out


def cuda_provider_options(graph_capture: bool) -> dict:
    """CUDA EP options (onnxruntime-gpu): the arena grows by what is asked (the default power-of-two growth can
    almost double the memory of multi-GB weights), cuDNN picks conv algorithms by heuristics (no exhaustive
    search at the first call of each new image size), copies go on the compute stream; `enable_cuda_graph` for
    the decoder (OrtSession)."""
    opts = {"device_id": "0", "arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC",
            "do_copy_in_default_stream": "1"}
    if graph_capture:
        opts["enable_cuda_graph"] = "1"
    return opts


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
    if "CUDAExecutionProvider" not in available:
        return ("CPUExecutionProvider",)
    from .ort_cuda import load_cuda_libraries

    load_cuda_libraries()  # CUDA / cuDNN from the nvidia-* wheels wherever they are; a session says what is missing
    return ("CUDAExecutionProvider", "CPUExecutionProvider")


def open_ort(paths: dict, contracts: dict, *, io_binding: bool = True, threads: int = 0,
             cuda_graph: bool = True, kv_in_place: bool = False, int4_accuracy_level: int = 1, mapped=(),
             cache_dir: Path | None = None, cached=None, prepack_order=(), int4_kernel: Path | None = None,
             f32_kernel: Path | None = None, started: threading.Event | None = None) -> dict:
    """The three ORT sessions; with `cuda_graph` the decoder captures its decode step (CUDA EP only);
    `int4_accuracy_level`: MatMulNBits accuracy level of ONNX Runtime's INT4 fusion (`int4_accuracy`).
    `kv_in_place`: the decoder writes its cache into the past buffers when present is bound to them
    (decoder.ort.onnx's GroupQueryAttention), so one KV set is enough (runtime/backends/ort_io.py).
    `mapped`: the graphs (dense weights) that run on memory-mapped weights on the CPU provider (`weights_mapped`);
    `cache_dir`: ONNX Runtime's optimized models cached there (runtime/backends/ort_cache.py), of the graphs named in
    `cached` (None: all); `prepack_order`: the graphs whose largest weight ONNX Runtime prepacks first, through
    cache_dir (runtime/backends/prepack_order.py); `int4_kernel`: the library of qwen_vl::MatMulInt4, which runs the
    decoder's INT4 products (fp32 activations) from its cached optimized model (runtime/backends/ort_int4_kernel.py);
    `f32_kernel`: the same library, whose qwen_vl::MatMulF32 runs a dense fp32 decoder's products on its mapped
    weights, through cache_dir (runtime/backends/ort_f32_kernel.py).
    On the CPU provider the sessions are created concurrently (`_open_concurrently`); `started` is set once every
    session's creation has begun (runtime/startup.py loads the tokenizer then)."""
    providers = ort_providers()

    def open_one(name: str) -> OrtSession:
        session = open_session(name)
        if session.f32_kernel is not None or session.int4_kernel is not None:
            session.warm_up()  # its mapped weights' page faults at start-up, not in the first request (warm_up)
        return session

    def open_session(name: str) -> OrtSession:
        return OrtSession(paths[name], contracts[name], providers=providers, io_binding=io_binding,
                          resident=_cache_outputs(contracts[name]), threads=threads,
                          graph_capture=cuda_graph and name == "decoder", int4_accuracy_level=int4_accuracy_level,
                          mapped=name in mapped, prepack_order=name in prepack_order,
                          int4_kernel=int4_kernel if name == "decoder" else None,
                          f32_kernel=f32_kernel if name == "decoder" else None,
                          cache_dir=cache_dir if cached is None or name in cached or name in prepack_order
                          or (name == "decoder" and f32_kernel is not None) else None)

    sessions = _open_concurrently(open_one, list(paths), list(providers) == ["CPUExecutionProvider"], started)
    if "decoder" in sessions:
        sessions["decoder"].kv_in_place = kv_in_place
    return sessions


def _open_concurrently(open_one, names: list, concurrent: bool, started: threading.Event | None) -> dict:
    """{name: open_one(name)}, one thread per graph when `concurrent`: ONNX Runtime releases the GIL while it creates
    a session (reading, optimizing and prepacking the weights: seconds for a multi-GB graph), so the graphs' session
    creations overlap on a multi-core CPU instead of adding up (docs/benchmarks.md, issue 24). Only on the CPU
    provider (the CUDA provider's concurrent session creation is not exercised here): elsewhere one after the other.
    `started` is set when every creation has begun (after the first one, serially); the first error is raised
    once all threads have ended."""
    if not concurrent or len(names) < 2:
        out = {}
        for name in names:
            out[name] = open_one(name)
            if started is not None:
                started.set()
        return out
    barrier = threading.Barrier(len(names), action=started.set if started is not None else None)

    def begin(name: str):
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass
        return open_one(name)

    with ThreadPoolExecutor(len(names), thread_name_prefix="ort-session") as pool:
        futures = {name: pool.submit(begin, name) for name in names}
        done = {}
        for name, future in futures.items():
            try:
                done[name] = future.result()
            except BaseException:
                barrier.abort()
                if started is not None:
                    started.set()
                raise
    return done


def _cache_outputs(contract) -> tuple[str, ...]:
    return tuple(t.name for t in contract.outputs if t.name.startswith("present_"))
