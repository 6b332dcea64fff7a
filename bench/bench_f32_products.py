"""fp32 decoder products on ONNX Runtime's CPU provider: MLAS on prepacked weights (ONNX Runtime's default), MLAS on
memory-mapped weights (`session.disable_prepacking`), and our qwen_vl::MatMulF32 on memory-mapped weights
(plugins/ortMatMulInt4/matMulF32*.cpp, runtime/backends/ort_f32_kernel.py): session creation time, and ms per call at
M = 1 (a decode step) and M = `--m` rows (a prefill).

  python bench/bench_f32_products.py [--layers 8] [--hidden 2048] [--inter 6144] [--q 2048] [--kv 1024]
      [--vocab 151936] [--m 210] [--threads 2] [--rounds 5] [--calls 5] [--variants mlas-prepacked mlas-mapped ours]

The graph: `--layers` decoder layers' products in decoder.ort.onnx's fused layout (q|k|v, o, gate|up, down as
MatMul on [K, N] initializers, each fed its own input) and lm_head as Gemm transB on [vocab, hidden] (what
export/decoder.py writes), weights in an external `.onnx.data` file as an export writes them. 8 layers of the 2B
shapes are 1.6 GB and lm_head 1.24 GB, the benchmark checkpoint's 2.86 GB (bench/make_random_checkpoint.py). Random
N(0, 1) weights and activations. Every variant's session is made in a fresh child process first (creation time,
the page cache warm), then all are timed in this process round robin: `--rounds` rounds of `--calls` calls of each.
The error column compares the last product with numpy's float64 product.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import machine, utc_now  # noqa: E402

VARIANTS = ("mlas-prepacked", "mlas-mapped", "ours")


def write_graph(path: Path, args, rng) -> dict:
    """The products' graph at `path` (weights in path.onnx.data) -> {input name: K} and the last product's weight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    per = [("qkv", args.hidden, args.q + 2 * args.kv), ("o", args.q, args.hidden),
           ("gate_up", args.hidden, 2 * args.inter), ("down", args.inter, args.hidden)]
    nodes, inits, inputs, outputs, feeds_k = [], [], [], [], {}
    last = None
    for layer in range(args.layers):
        for name, k, n in per:
            w = rng.standard_normal((k, n), np.float32)
            tag = f"l{layer}.{name}"
            inits.append(numpy_helper.from_array(w, f"w_{tag}"))
            if f"x{k}" not in feeds_k:
                feeds_k[f"x{k}"] = k
                inputs.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["m", k]))
            nodes.append(helper.make_node("MatMul", [f"x{k}", f"w_{tag}"], [f"y_{tag}"]))
            outputs.append(helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT, ["m", n]))
            last = (f"y_{tag}", f"x{k}", w)
    head = rng.standard_normal((args.vocab, args.hidden), np.float32)
    inits.append(numpy_helper.from_array(head, "lm_head"))
    inputs.append(helper.make_tensor_value_info("last", TensorProto.FLOAT, [1, args.hidden]))
    nodes.append(helper.make_node("Gemm", ["last", "lm_head"], ["logits"], transB=1))
    outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, args.vocab]))
    model = helper.make_model(helper.make_graph(nodes, "products", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data",
                    size_threshold=1024)
    return {"feeds": feeds_k, "last": last, "head": head}


def open_session(path: Path, variant: str, threads: int):
    import onnx
    import onnxruntime as ort

    from qwen_vl_trt.runtime.backends import ort_f32_kernel, ort_int4_kernel

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if variant == "mlas-prepacked":
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    opts.add_session_config_entry("session.disable_prepacking", "1")
    if variant == "mlas-mapped":
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    library = ort_int4_kernel.library()
    if library is None:
        raise SystemExit("ours: build/ort/libqwen_vl_ort_kernels.so is not built (bash plugins/ortMatMulInt4/build.sh)"
                         " or this CPU has no AVX-512F")
    opts.register_custom_ops_library(str(library))
    model = onnx.load(str(path), load_external_data=False)
    ort_f32_kernel.rename_dense_products(model)
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def creation_seconds(path: Path, variant: str, threads: int) -> float:
    """Session creation in a fresh process (the graph's files in the page cache)."""
    code = (f"import sys, time; sys.path.insert(0, {str(HERE)!r}); import bench_f32_products as b; "
            f"from pathlib import Path; t = time.perf_counter(); "
            f"s = b.open_session(Path({str(path)!r}), {variant!r}, {threads}); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=6144)
    ap.add_argument("--q", type=int, default=2048)
    ap.add_argument("--kv", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--m", type=int, default=210, help="rows of the prefill call (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="qwen-vl-f32-") as tmp:
        path = Path(tmp) / "products.onnx"
        graph = write_graph(path, args, rng)
        created = {v: creation_seconds(path, v, args.threads) for v in args.variants}
        sessions = {v: open_session(path, v, args.threads) for v in args.variants}
        rows = [1] + ([args.m] if args.m > 1 else [])
        feeds = {m: {name: rng.standard_normal((m, k), np.float32) for name, k in graph["feeds"].items()}
                 for m in rows}
        for m in rows:
            feeds[m]["last"] = rng.standard_normal((1, args.hidden), np.float32)
        y_name, x_name, w = graph["last"]
        errors = {}
        for m in rows:
            want = feeds[m][x_name].astype(np.float64) @ w.astype(np.float64)
            head = feeds[m]["last"].astype(np.float64) @ graph["head"].T.astype(np.float64)
            for v, sess in sessions.items():
                y, logits = sess.run([y_name, "logits"], feeds[m])
                errors[(v, m)] = max(float(np.abs(y - want).max() / np.abs(want).max()),
                                     float(np.abs(logits - head).max() / np.abs(head).max()))
        del graph
        times = {(v, m): [] for v in sessions for m in rows}
        for _ in range(args.rounds):
            for m in rows:
                for v, sess in sessions.items():
                    t0 = time.perf_counter()
                    for _ in range(args.calls if m == 1 else 1):
                        sess.run(None, feeds[m])
                    times[(v, m)].append((time.perf_counter() - t0) * 1e3 / (args.calls if m == 1 else 1))
        weight_bytes = path.with_name(path.name + ".data").stat().st_size
    print(f"# fp32 products, ONNX Runtime CPU -- {utc_now()}")
    print(f"machine: {machine()}; {args.threads} threads; {args.layers} layers (hidden {args.hidden}, MLP {args.inter}, "
          f"q {args.q}, kv {args.kv}) + lm_head (vocab {args.vocab}): {weight_bytes / 1e9:.2f} GB of fp32 weights")
    print(f"command: python bench/bench_f32_products.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print("| variant | session creation s | M | ms per call (median, min-max) | vs first variant (median of "
          "per-round ratios) | GB/s at M = 1 | max rel err vs float64 |")
    print("|---|---|---|---|---|---|---|")
    for m in rows:
        base = times[(args.variants[0], m)]
        for v in args.variants:
            ts = times[(v, m)]
            ratio = statistics.median(t / b for t, b in zip(ts, base))
            rate = f"{weight_bytes / (statistics.median(ts) / 1e3) / 1e9:.1f}" if m == 1 else "-"
            print(f"| {v} | {created[v]:.2f} | {m} | {statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f}) | "
                  f"{ratio:.2f} | {rate} | {errors[(v, m)]:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
