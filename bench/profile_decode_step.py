"""Where a decode step of ours goes on the CPU: ONNX Runtime's per-node profile of decoder.ort.onnx, as bytes read.

  python bench/profile_decode_step.py ARTIFACTS [--image IMG] [--tokens 24] [--threads 2] [--mapped]
      [--dense-kernel auto|mlas]

Runs one greedy request (the image, "Describe this image.") with ONNX Runtime profiling on (bench/benchlib.py
ort_profiling), drops the prefill run, and sums the kernel times of the decode runs per op type and for the
largest nodes; for the MatMul / Gemm / MatMulNBits nodes, the bytes of their weight initializers (from the graph)
over their time, in GB/s. Also the wall time per step and the host time between steps (step wall time - the
run's time inside ONNX Runtime). `--dense-kernel` (trt-run's): a dense fp32 decoder's products as qwen_vl::MatMulF32 on
mapped weights (auto, the default where it runs) or ONNX Runtime's MatMul / Gemm (mlas); `--mapped`: with mlas,
memory-mapped dense weights (prepacking off) instead of ONNX Runtime's default.
The profiler's own cost is about 5 us per node (~350 nodes: ~2 ms a step), not subtracted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import machine, ort_profiling, utc_now  # noqa: E402


def weight_bytes(graph: Path) -> dict:
    """node name -> bytes of the initializers it reads (external data lengths, raw data otherwise)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    size = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        size[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data) or int(
            np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    # an INT4 product is DequantizeLinear(q, s) -> MatMul in the file and one MatMulNBits (the MatMul's name) in
    # the session: its bytes are the DequantizeLinear's initializers
    dq = {n.output[0]: sum(size.get(i, 0) for i in n.input) for n in model.graph.node
          if n.op_type == "DequantizeLinear"}
    return {n.name: sum(size.get(i, 0) + dq.get(i, 0) for i in n.input) for n in model.graph.node}


def decode_runs_from(runs: list) -> int:
    """Index of the first decode step among the decoder's runs [(start, end)] in time order: the one after the
    prefill (the longest of them)."""
    longest = max(range(len(runs)), key=lambda i: runs[i][1] - runs[i][0])
    return longest + 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--image", default=str(Path.home() / ".cache" / "qwen-vl-trt-bench" / "grace_hopper_448.png"))
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mapped", action="store_true", help="load_model(ort_prepack=False)")
    ap.add_argument("--dense-kernel", choices=("auto", "mlas"), default="auto")
    args = ap.parse_args(argv)
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    with tempfile.TemporaryDirectory() as tmp, ort_profiling(tmp):
        model = load_model(args.artifacts, "onnxruntime", threads=args.threads, ort_prepack=not args.mapped,
                           dense_kernel=args.dense_kernel)
        req = Preprocessor(model.manifest).prepare(Request("Describe this image.", (args.image,)))
        res = generate(model, [req], Sampler(SamplingConfig(temperature=0)), args.tokens, ignore_eos=True)[0]
        events = json.loads(Path(model.sessions["decoder"].sess.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
                  and e.get("name") == "model_run")
    # the decode steps are the runs after the prefill, the longest run by far; before it, a decoder on MatMulF32 /
    # MatMulInt4 has a warm-up run on zeros at start-up (runtime/backends/ort.py OrtSession.warm_up)
    runs = runs[decode_runs_from(runs):]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and any(a <= e["ts"] <= b for a, b in runs)]
    steps = len(runs)
    per_op, per_node = defaultdict(float), defaultdict(float)
    for e in nodes:
        per_op[e["args"]["op_name"]] += e["dur"] / steps
        per_node[(e["name"][: -len("_kernel_time")], e["args"]["op_name"])] += e["dur"] / steps
    run_us = sum(b - a for a, b in runs) / steps
    wb = weight_bytes(args.artifacts / "decoder.ort.onnx")
    print(f"# decode step profile -- {utc_now()}\nmachine: {machine()}; {args.threads} threads; "
          f"{'mapped' if args.mapped else 'prepacked'} weights, --dense-kernel {args.dense_kernel} (MatMulF32: "
          f"{'yes' if getattr(model.sessions['decoder'], 'f32_kernel', None) else 'no'}); {steps} decode steps")
    print(f"wall per step {1e3 / res.timings['decode_tok_per_s']:.1f} ms; inside ONNX Runtime {run_us / 1e3:.1f} ms; "
          f"kernels {sum(per_op.values()) / 1e3:.1f} ms")
    print("\n| op type | ms / step | share |\n|---|---|---|")
    total = sum(per_op.values())
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1]):
        print(f"| {op} | {us / 1e3:.2f} | {us / total:.0%} |")
    print("\n| node | op | ms / step | weight MB | GB/s |\n|---|---|---|---|---|")
    for (name, op), us in sorted(per_node.items(), key=lambda kv: -kv[1])[:12]:
        b = wb.get(name, 0)
        print(f"| {name} | {op} | {us / 1e3:.2f} | {b / 1e6:.0f} | {b / us / 1e3:.1f} |" if b else
              f"| {name} | {op} | {us / 1e3:.2f} | - | - |")
    products = ("MatMul", "Gemm", "MatMulNBits", "MatMulInt4", "MatMulF32", "FusedMatMul")
    mm = [(n, us) for (n, op), us in per_node.items() if op in products]
    b = sum(wb.get(n, 0) for n, _ in mm)
    t = sum(us for _, us in mm)
    print(f"\nall weight products: {b / 1e9:.2f} GB in {t / 1e3:.1f} ms a step = {b / t / 1e3:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
