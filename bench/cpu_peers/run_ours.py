"""bench_cpu_peers.py runner: qwen-vl-trt's ONNX Runtime backend (decoder.ort.onnx), in the project's venv.

  python bench/cpu_peers/run_ours.py ARTIFACTS --image IMG --prompt TEXT [--tokens 64] [--threads 2]
         [--option int4_activations=int8] [--option ort_cache=DIR] [--option prepack=1] [--option int4_kernel=mlas]
         [--option dense_kernel=mlas]

Starts as trt-run does: runtime/startup.py load_model_and_preprocessor (sessions concurrently, tokenizer alongside;
an INT4 decoder from the default optimized-model cache in ARTIFACTS/.ort-cache, written by the first run).
`ort_cache`: ONNX Runtime's optimized models of all three graphs cached in DIR (runtime/backends/ort_cache.py; warm
after the first run; `off`: no cache, the graphs as exported, as `trt-run --ort-cache off`); `prepack=0`:
memory-mapped dense weights (load_model(ort_prepack=False)) instead of ONNX Runtime's prepacking; `int4_kernel=mlas`:
ONNX Runtime's MatMulNBits instead of qwen_vl::MatMulInt4 (trt-run --int4-kernel mlas); `dense_kernel=mlas`:
ONNX Runtime's MatMul / Gemm for a dense fp32 decoder instead of qwen_vl::MatMulF32 (trt-run --dense-kernel mlas).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clock import RunClock, common_args  # noqa: E402

clock = RunClock()


def main() -> None:
    args = common_args()
    from qwen_vl_trt.runtime.generate import generate
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig
    from qwen_vl_trt.runtime.startup import load_model_and_preprocessor

    cache = args.options.get("ort_cache")
    model, pre = load_model_and_preprocessor(  # what trt-run does (runtime/serve/cli.py)
        args.artifacts, "onnxruntime", threads=args.threads, ort_cache=False if cache == "off" else cache,
        ort_prepack=args.options.get("prepack", "1") == "1",
        int4_activations=args.options.get("int4_activations"),  # trt-run --int4-activations
        int4_kernel=args.options.get("int4_kernel", "auto"),  # trt-run --int4-kernel
        dense_kernel=args.options.get("dense_kernel", "auto"))  # trt-run --dense-kernel
    clock.ready()
    clock.request()
    req = pre.prepare(Request(args.prompt, (args.image,)))
    generate(model, [req], Sampler(SamplingConfig(temperature=0)), args.tokens, ignore_eos=True,
             on_token=lambda b, t: clock.token(t))
    clock.emit({"prompt_tokens": req.num_tokens})


if __name__ == "__main__":
    main()
