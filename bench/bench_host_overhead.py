"""Host-side overhead of the runtime on the CPU, with a tiny checkpoint whose model compute is small (a script).

  python bench/bench_host_overhead.py [--layers 28] [--tokens 128] [--batch 1 8] [--repeat 3] [--threads 1]

Makes the tiny random-weight Qwen3-VL demo checkpoint (export/demo_checkpoint.py; hidden 64, the real
tokenizer and vocabulary) with `--layers` text layers (28 = Qwen3-VL-2B's count, so the per-layer cost of
binding a KV cache shows at its real size), exports fp32 graphs (ONNX Runtime CPU EP), then prints:

1. Per request, median ms per stage for a 448 / 896 / 1344 px PNG: image decode (PIL), `preprocess_image`
   (resize, rescale + normalize, patchify), chat template + tokenizer (`build_prompt`), MRoPE positions,
   the vision graph's host inputs (`vision_feeds`), and `Preprocessor.prepare` end to end.
2. Per decoded token (greedy, `--tokens` tokens, batch 1 and 8): wall time per token, split into the time
   inside ONNX Runtime calls (decode phase = every call after the decoder's prefill call) per session -- the
   decoder, the embedding graph, any other (a device sampler) -- and the host Python outside ORT calls
   (sampling, positions, feeds, binding, cache bookkeeping, the loop); plus the graph nodes ORT runs per token
   (from its profiler; on a GPU without CUDA graphs each is about one kernel launch).
Both paths: plain numpy feeds and `io_binding` (the CUDA EP's path, run here on the CPU EP).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import OrtCalls, machine, median_ms, node_counts, ort_profiling, utc_now, write_images  # noqa: E402

SIZES = (448, 896, 1344)
PROMPT = "a " * 50  # 50 text tokens


def make_artifacts(work: Path, layers: int) -> Path:
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits
    from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_TINY, make_checkpoint

    out = work / f"art-{layers}"
    if (out / "manifest.json").is_file():
        return out
    text = {**QWEN3_VL_TINY["text_config"], "num_hidden_layers": layers}
    ckpt = make_checkpoint(work / f"ckpt-{layers}", "qwen3_vl", seed=0, config_overrides={"text_config": text})
    export_all(ckpt, out, "fp32", Limits(max_batch=8, max_seq=2048, max_cache_len=4096))
    return out


def request_rows(art: Path, images: dict) -> list[list[str]]:
    from qwen_vl_trt.runtime import positions, preprocess, prompt
    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.runtime.pipeline import Preprocessor, vision_feeds
    from qwen_vl_trt.runtime.request import Request

    manifest = load_manifest(art)
    pre = Preprocessor(manifest)
    spec = manifest.spec
    cols = {}
    for size, path in images.items():
        img = preprocess.load_image(path)
        pv, grid = preprocess.preprocess_image(img, pre.image_cfg)
        messages = prompt.build_messages(PROMPT, None, n_images=1, video=False)

        def build():
            return prompt.build_prompt(pre.tokenizer, messages, image_grids=[grid], family="qwen3_vl",
                                       merge_size=spec.vision.spatial_merge_size)

        built = build()
        cols[size] = {
            "image decode (PIL, PNG)": median_ms(lambda: preprocess.load_image(path), 10),
            "preprocess_image (resize, normalize, patchify)": median_ms(
                lambda: preprocess.preprocess_image(img, pre.image_cfg), 10),
            "chat template + tokenizer": median_ms(build, 10),
            "MRoPE positions": median_ms(lambda: positions.qwen3_vl_rope_index(
                built.input_ids[None], built.mm_token_type_ids[None], [grid],
                spatial_merge_size=spec.vision.spatial_merge_size), 20),
            "vision host inputs": median_ms(lambda: vision_feeds(spec, pv, np.asarray([grid])), 20),
            "Preprocessor.prepare, end to end": median_ms(lambda: pre.prepare(Request(PROMPT, (str(path),))), 5),
        }
    names = list(next(iter(cols.values())))
    return [[n] + [f"{cols[s][n]:.2f}" for s in images] for n in names]


def token_row(art: Path, batch: int, tokens: int, repeat: int, threads: int, io_binding: bool, image: Path,
              prof_dir: Path) -> list[str]:
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    def run(model):
        req = Preprocessor(model.manifest).prepare(Request(PROMPT, (str(image),)))
        return generate(model, [req] * batch, Sampler(SamplingConfig(temperature=0)), tokens, ignore_eos=True)

    model = load_model(art, "onnxruntime", io_binding=io_binding, threads=threads)
    run(model)  # warm-up
    named = {id(model.sessions[k].sess): k for k in ("decoder", "embed")}
    cols = {"total": [], "decoder": [], "embed": [], "other": []}
    for _ in range(repeat):
        with OrtCalls() as calls:
            res = run(model)
        n = res[0].timings["decode_tokens"]
        cols["total"].append(res[0].timings["decode_ms"] / n)
        split = {"decoder": 0.0, "embed": 0.0, "other": 0.0}
        for sess, _, sec in calls.after_first_call_of(model.sessions["decoder"].sess):
            split[named.get(id(sess), "other")] += 1e3 * sec / n
        for k, v in split.items():
            cols[k].append(v)
    med = {k: float(np.median(v)) for k, v in cols.items()}
    host = med["total"] - med["decoder"] - med["embed"] - med["other"]
    path = "io_binding" if io_binding else "numpy feeds"
    return [f"{path}, batch {batch}", f"{med['total']:.3f}", f"{med['decoder']:.3f}", f"{med['embed']:.3f}",
            f"{med['other']:.3f}", f"{host:.3f}", str(nodes_per_token(art, threads, io_binding, run, prof_dir)),
            f"{1e3 / med['total'] * batch:.0f}"]


def nodes_per_token(art: Path, threads: int, io_binding: bool, run, prof_dir: Path) -> int:
    """Graph nodes ONNX Runtime executes per decode step (all sessions), from its profiler (counts only: the
    profiler's per-node timings are dominated by its own overhead at this size)."""
    from qwen_vl_trt.runtime.generate import load_model

    with ort_profiling(prof_dir):  # sessions made during the run (a device sampler) profile too
        model = load_model(art, "onnxruntime", io_binding=io_binding, threads=threads)
        with OrtCalls() as calls:
            res = run(model)
    first = next(i for i, c in enumerate(calls.calls) if c[0] is model.sessions["decoder"].sess)
    total = 0
    for sess in {id(c[0]): c[0] for c in calls.calls}.values():
        counts = node_counts(sess)
        idx = [i for i, c in enumerate(calls.calls) if c[0] is sess]
        total += sum(k for i, k in zip(idx, counts) if i > first)
    return round(total / res[0].timings["decode_tokens"])


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28, help="text decoder layers of the tiny model (2B has 28)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--work", default=None, help="directory for the checkpoint and artifacts (default: a temp dir)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="qwen-vl-host-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    art = make_artifacts(work, args.layers)
    images = write_images(work, SIZES)

    print(f"Per request, median ms (tiny Qwen3-VL, prompt of 50 text tokens + one image):\n")
    print(table(["stage"] + [f"{s}x{s}" for s in SIZES], request_rows(art, images)))
    rows = [token_row(art, b, args.tokens, args.repeat, args.threads, binding, images[448], work / "prof")
            for binding in (False, True) for b in args.batch]
    print(f"\nPer decoded token, ms (greedy, {args.tokens} tokens, 448x448 image + 50 text tokens, "
          f"{args.layers} text layers, ORT CPU EP, {args.threads} intra-op thread(s)):\n")
    print(table(["path", "per token", "decoder call", "embed call", "other ORT calls", "host Python outside ORT",
                 "ORT nodes run per token", "tok/s"], rows))
    print(f"\ncommand: python bench/bench_host_overhead.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {machine()}")
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}; date: {utc_now()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
