"""Time of a tensor-parallel decoder step on ONNX Runtime (CPU) against the 1-rank decoder, per layer.

    python bench/bench_tp.py [--tp 2] [--hidden 1024] [--layers 4] [--prefill 256] [--steps 20] [--threads 1]

Makes a random-weight Qwen3-VL checkpoint of the given width (demo_checkpoint with a wider text config), exports
it at 1 rank and at --tp ranks (fp32), then times on random inputs:
- `1-rank`: decoder.onnx in one ONNX Runtime session (`--threads` intra-op threads);
- `tp`: the `TpDecoderSession` step that trt-run runs (runtime/backends/tp.py: N rank processes, `--threads`
  each, MPI all-reduces, the KV cache sent to and gathered from the ranks each step);
for a prefill of --prefill tokens and for decode steps (median of --steps, cache 2 x --prefill). Per layer = step
time / layers (lm_head and the vocab gather included in the step). The issue's target: tp within 1.3x of 1-rank.
Needs as many free cores as ranks (x threads) for a fair figure; say how busy the machine was.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make(out: Path, hidden: int, layers: int, tp: int) -> dict:
    from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_TINY, make_checkpoint
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits

    text = {**QWEN3_VL_TINY["text_config"], "hidden_size": hidden, "intermediate_size": 3 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [12, 10, 10],
                                "mrope_interleaved": True}}
    vision = {**QWEN3_VL_TINY["vision_config"], "out_hidden_size": hidden}
    ckpt = make_checkpoint(out / "ckpt", "qwen3_vl", config_overrides={"text_config": text, "vision_config": vision})
    limits = Limits(max_batch=1, max_seq=1024, max_cache_len=2048, max_patches=1024)
    for n in (1, tp):
        export_all(ckpt, out / f"tp{n}", "fp32", limits, tp=n)
    return {n: out / f"tp{n}" for n in (1, tp)}


def feeds(spec, seq: int, past: int, cache_len: int, rng) -> dict:
    t = spec.text
    f = {"inputs_embeds": rng.standard_normal((1, seq, t.hidden_size), np.float32),
         "deepstack_embeds": np.zeros((spec.num_deepstack, 1, seq, t.hidden_size), np.float32),
         "position_ids": np.broadcast_to(np.arange(past, past + seq), (3, 1, seq)).astype(np.int64).copy(),
         "past_lengths": np.array([past], np.int64), "logits_index": np.array([seq - 1], np.int64)}
    for i in range(t.num_hidden_layers):
        for kv in ("key", "value"):
            f[f"past_{kv}.{i}"] = np.zeros((1, t.num_key_value_heads, cache_len, t.head_dim), np.float32)
    return f


def timed(run, f, n: int) -> float:
    run(f)  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        run(f)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.runtime.backends.ort import OrtSession
    from qwen_vl_trt.runtime.backends.tp import TpDecoderSession

    with tempfile.TemporaryDirectory() as tmp:
        dirs = make(Path(tmp), args.hidden, args.layers, args.tp)
        one, many = load_manifest(dirs[1]), load_manifest(dirs[args.tp])
        single = OrtSession(one.graph_paths()["decoder"], one.contracts["decoder"], io_binding=False,
                            threads=args.threads)
        tp = TpDecoderSession(many, args.threads)
        rng = np.random.default_rng(0)
        cache = 2 * args.prefill
        rows = []
        try:
            for phase, seq, past in (("prefill", args.prefill, 0), ("decode", 1, args.prefill)):
                f = feeds(one.spec, seq, past, cache, rng)
                t1 = timed(single.run, f, max(3, args.steps // (4 if seq > 1 else 1)))
                tn = timed(tp.run, f, max(3, args.steps // (4 if seq > 1 else 1)))
                rows.append((phase, t1, tn))
        finally:
            tp.close()
    L = args.layers
    print(f"| phase | 1-rank ms / layer | TP {args.tp} ms / layer | ratio |\n|---|---|---|---|")
    for phase, t1, tn in rows:
        print(f"| {phase} ({args.prefill if phase == 'prefill' else 1} tokens) | {1e3 * t1 / L:.2f} | "
              f"{1e3 * tn / L:.2f} | {tn / t1:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
