"""ONNX Runtime's fused graphs (`*.ort.onnx`) vs the plugin graphs' reference bodies vs HF, in one run (a script).

  python bench/bench_ort_graphs.py [--text-layers 4] [--vision-depth 4] [--sizes 448 896] [--prompt 512]
                                   [--tokens 32] [--batch 1 4] [--threads 2] [--work DIR]

A random-weight Qwen3-VL checkpoint with Qwen3-VL-2B's layer shapes (text hidden 2048, 16/8 heads of 128,
MLP 6144, tied 151936-token vocabulary; vision hidden 1024, 16 heads of 64, MLP 4096) and fewer layers
(`--text-layers`, `--vision-depth`), fp32 graphs (export/demo_checkpoint.py, export_all), then on ONNX
Runtime (the CUDA EP when onnxruntime-gpu is installed, else the CPU EP) for `--ort-graphs fused` and `plugin`,
and for HF transformers (fp32, sdpa, same device as torch's default: the CPU here) in the same process:
vision encoder ms per image size, prefill ms of a `--prompt`-token text prompt, decode tok/s at each batch
(`--tokens` new tokens, greedy), and whether the greedy tokens of our two paths equal HF's. Ratios are ours /
HF (speed: higher is better). CPU numbers say nothing about the GPU targets of issue 6 (bench/bench_pipeline.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import ensure_importable, machine, median_ms, utc_now, write_images  # noqa: E402

ensure_importable(HERE.parent)

TEXT_2B = {"hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 16, "num_key_value_heads": 8,
           "head_dim": 128, "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                                "mrope_section": [24, 20, 20], "mrope_interleaved": True}}
VISION_2B = {"hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "out_hidden_size": 2048}


def make_checkpoint(work: Path, text_layers: int, vision_depth: int) -> Path:
    from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_TINY, make_checkpoint as make

    text = {**QWEN3_VL_TINY["text_config"], **TEXT_2B, "num_hidden_layers": text_layers,
            "max_position_embeddings": 32768}
    deep = [i for i in (0, 1, 3) if i < vision_depth] or [0]
    vision = {**QWEN3_VL_TINY["vision_config"], **VISION_2B, "depth": vision_depth,
              "deepstack_visual_indexes": deep}
    return make(work / "ckpt", "qwen3_vl", tie_word_embeddings=True,
                config_overrides={"text_config": text, "vision_config": vision})


def text_prompt(n: int) -> str:
    """A user message of about n tokens (the chat template adds a few)."""
    words = "the quick brown fox jumps over a lazy dog while counting stars".split()
    return " ".join(words[i % len(words)] for i in range(n))


def ours(art: Path, fused: bool, images: dict, prompt: str, tokens: int, batches, threads: int,
         int4_activations: str | None = None) -> dict:
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor, vision_feeds
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    model = load_model(art, "onnxruntime", threads=threads, ort_fused=fused, int4_activations=int4_activations)
    pre = Preprocessor(model.manifest)
    out = {"provider": model.sessions["decoder"].sess.get_providers()[0], "vision_ms": {}, "tok_s": {}}
    for size, path in images.items():
        m = pre.prepare(Request("x", (str(path),))).media[0]
        feeds = vision_feeds(model.spec, m.pixel_values, np.asarray([m.grid_thw]))
        out["vision_ms"][size] = median_ms(lambda: model.sessions["vision"].run(feeds), repeat=3, warmup=1)
    req = pre.prepare(Request(prompt))
    out["prompt_tokens"] = req.num_tokens
    greedy = Sampler(SamplingConfig(temperature=0))
    for batch in batches:
        generate(model, [req] * batch, greedy, 2, ignore_eos=True)  # warm-up
        res = generate(model, [req] * batch, greedy, tokens, ignore_eos=True)
        t = res[0].timings
        out["tok_s"][batch] = batch * t["decode_tok_per_s"]
        if batch == batches[0]:
            out["prefill_ms"], out["tokens"] = t["prefill_ms"], res[0].token_ids
    return out


def hf(ckpt: Path, images: dict, prompt_ids: list, tokens: int, batches, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    proc = transformers.AutoProcessor.from_pretrained(ckpt)
    out = {"vision_ms": {}, "tok_s": {}}
    with torch.no_grad():
        for size, path in images.items():
            from PIL import Image

            x = proc.image_processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")
            out["vision_ms"][size] = median_ms(lambda: model.model.visual(x["pixel_values"],
                                                                          grid_thw=x["image_grid_thw"]), 3, 1)
        ids = torch.tensor([prompt_ids])
        out["prefill_ms"] = median_ms(lambda: model(input_ids=ids, use_cache=True), 3, 1)
        for batch in batches:  # decode rate: (tokens - 2) steps = generate(tokens) - generate(2), same prompt
            inp = ids.expand(batch, -1)
            kw = dict(do_sample=False, pad_token_id=0)
            model.generate(inp, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
            t0 = time.perf_counter()
            model.generate(inp, max_new_tokens=2, min_new_tokens=2, **kw)
            short = time.perf_counter() - t0
            t0 = time.perf_counter()
            gen = model.generate(inp, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
            full = time.perf_counter() - t0
            out["tok_s"][batch] = batch * (tokens - 2) / (full - short)
            if batch == batches[0]:
                out["tokens"] = gen[0, ids.shape[1]:].tolist()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[448, 896])
    ap.add_argument("--prompt", type=int, default=512, help="text prompt tokens (about)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="qwen-vl-ort-graphs-"))
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits

    t0 = time.perf_counter()
    ckpt = make_checkpoint(work, args.text_layers, args.vision_depth)
    art = work / "art"
    image_tokens = max(args.sizes) ** 2 // (32 * 32)  # merged 2x2 patches of 16 px
    max_seq = max(args.prompt, image_tokens) + 64
    export_all(ckpt, art, "fp32", Limits(max_patches=16384, max_batch=max(args.batch), max_seq=max_seq,
                                               max_cache_len=max_seq + args.tokens + 16))
    print(f"checkpoint + fp32 export: {time.perf_counter() - t0:.0f} s ({work})", file=sys.stderr)
    images = write_images(work, args.sizes)
    prompt = text_prompt(args.prompt)
    runs = {"fused": ours(art, True, images, prompt, args.tokens, args.batch, args.threads),
            "plugin": ours(art, False, images, prompt, args.tokens, args.batch, args.threads)}
    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request

    ids = Preprocessor(load_manifest(art)).prepare(Request(prompt)).input_ids.tolist()
    ref = hf(ckpt, images, ids, args.tokens, args.batch, args.threads)

    print(f"# ONNX Runtime graphs vs HF -- {utc_now()}")
    print(f"machine: {machine()}; provider {runs['fused']['provider']}, {args.threads} threads; Qwen3-VL-2B shapes, "
          f"{args.text_layers} text layers, vision depth {args.vision_depth}, fp32, random weights")
    print(f"command: python bench/bench_ort_graphs.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print("| measurement | ours, *.ort.onnx | ours, plugin graphs | HF | fused / HF | plugin / HF |")
    print("|---|---|---|---|---|---|")

    def row(name, f, p, h, lower_better):
        ratio = (lambda a: h / a) if lower_better else (lambda a: a / h)
        print(f"| {name} | {f:.1f} | {p:.1f} | {h:.1f} | {ratio(f):.2f}x | {ratio(p):.2f}x |")

    for size in args.sizes:
        row(f"vision encoder {size}x{size} px, ms", runs["fused"]["vision_ms"][size],
            runs["plugin"]["vision_ms"][size], ref["vision_ms"][size], True)
    row(f"prefill {runs['fused']['prompt_tokens']} text tokens, ms", runs["fused"]["prefill_ms"],
        runs["plugin"]["prefill_ms"], ref["prefill_ms"], True)
    for batch in args.batch:
        row(f"decode tok/s, batch {batch} ({args.tokens} new tokens)", runs["fused"]["tok_s"][batch],
            runs["plugin"]["tok_s"][batch], ref["tok_s"][batch], False)
    same = {k: runs[k]["tokens"] == ref["tokens"] for k in runs}
    print(f"\ngreedy tokens == HF's (batch {args.batch[0]}): *.ort.onnx {same['fused']}, plugin graphs {same['plugin']}")
    print("ratios: speed-ups over HF (time ratios inverted), measured in this run")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
