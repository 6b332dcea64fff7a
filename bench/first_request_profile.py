"""Where a fresh process's first request spends its time, against the requests after it (issue 24's TTFT).

  python bench/first_request_profile.py ARTIFACTS IMAGE [--requests 4] [--threads 2] [--profile-prepare]
                                       [--no-prestart]

Loads as trt-run does (runtime/startup.py), then sends the same image + "Describe this image." `--requests` times,
one at a time, 2 new tokens each; prints per request `Preprocessor.prepare`'s wall time and `generate`'s timings
(vision_ms, prefill_ms = embed + prefill, ttft_ms = both). `--profile-prepare`: also cProfile the first `prepare`
(top 25 by cumulative time). `--no-prestart`: the image-decode worker that start-up pre-starts
(runtime/media_guard.py `DecodePool.prestart`) is stopped before the first request, which then starts one itself,
as before the pre-start. ONNX Runtime CPU; no torch.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts")
    ap.add_argument("image")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile-prepare", action="store_true")
    ap.add_argument("--no-prestart", action="store_true")
    args = ap.parse_args()

    from qwen_vl_trt.runtime.generate import generate
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig
    from qwen_vl_trt.runtime.startup import load_model_and_preprocessor

    model, pre = load_model_and_preprocessor(args.artifacts, "onnxruntime", threads=args.threads)
    if args.no_prestart:
        from qwen_vl_trt.runtime import media_guard

        pool = media_guard.pool()
        deadline = time.monotonic() + 30
        while not pool._idle and time.monotonic() < deadline:  # the pre-started worker, once it is up
            time.sleep(0.01)
        pool.close()
    for i in range(args.requests):
        prof = cProfile.Profile() if i == 0 and args.profile_prepare else None
        t = time.perf_counter()
        if prof:
            prof.enable()
        req = pre.prepare(Request("Describe this image.", (args.image,)))
        if prof:
            prof.disable()
        prepare_ms = 1e3 * (time.perf_counter() - t)
        res = generate(model, [req], Sampler(SamplingConfig(temperature=0)), 2, ignore_eos=True)[0]
        keys = ("vision_ms", "prefill_ms", "ttft_ms")
        print(f"request {i + 1}: prepare {prepare_ms:.0f} ms, " + ", ".join(f"{k} {res.timings[k]:.0f}" for k in keys),
              flush=True)
        if prof:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
