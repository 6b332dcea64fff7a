"""Prefix and encoder caches of the in-flight engine, on vs off in the same run (issue 23).

  python bench/bench_prefix_cache.py --model-dir ARTIFACTS [--backend onnxruntime|tensorrt] [--ort-graphs fused]
                                     [--turns 5] [--requests 32] [--system-tokens 500] [--new-tokens 32]
                                     [--max-batch B] [--repeat 3]

The engine (runtime/scheduler.py) in this process, greedy, `ignore_eos`, once with both caches off
(`prefix_cache_mb=0, encoder_cache_mb=0`) and once with the defaults, on the same prompts:

1. chat: a `--turns`-turn conversation about one 448x448 photo (random pixels, seeded). Each turn resends the
   whole history (the photo, the questions, the earlier answers: the text the engine generated for them) as a
   chat client does; turns run one at a time. Per turn: TTFT = first token - submission (preprocessing of the
   request happens before submission and is the same with and without the caches). `--repeat` fresh
   conversations (new photo each), median per turn. The answers come from the cache-off run, so both runs see
   the same prompts.
2. shared system prompt: `--requests` requests with the same system prompt of about `--system-tokens` tokens, each
   with its own 448x448 image, all submitted at once; throughput = requests / makespan (first submission -> last
   token) and generated tokens / makespan. `--repeat` rounds, off and on interleaved in each (so a change of the
   machine's load hits both alike), median per mode; the ratio is that of the medians. Each round's engines are
   fresh (empty caches), and the images are decoded and preprocessed (their content digests included:
   runtime/pipeline.py) before the clock starts, in both modes, as the front-ends do on the request's own thread.

Prints markdown rows with the command, machine and date. The artifacts need max_seq >= system tokens + 250 and
max_cache_len >= that + --new-tokens (export_all.sh --max-seq / --max-cache-len).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import ensure_importable, machine, utc_now  # noqa: E402

QUESTIONS = ("Describe this photo.", "What colour is the top left corner?", "Is there any text in it?",
             "What would you call this picture?", "Summarize our conversation in one sentence.")
SYSTEM_WORDS = ("You are a careful assistant for a photo archive. Look at every picture closely, name the main "
                "objects, their colours and where they are, and mention anything unusual. ")


def photo(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def engine(model, args, on: bool):
    from qwen_vl_trt.runtime.scheduler import Engine

    sizes = {} if on else {"prefix_cache_mb": 0, "encoder_cache_mb": 0}
    return Engine(model, args.max_batch, **sizes)


def seq(prep, n: int):
    from qwen_vl_trt.runtime.sampling import SamplingConfig
    from qwen_vl_trt.runtime.scheduler import SeqRequest

    return SeqRequest(prep, n, SamplingConfig(temperature=0), ignore_eos=True)


def chat_ttft(model, pre, args) -> dict:
    """mode -> [turns] of median TTFT ms; also checks that both modes gave the same tokens."""
    from qwen_vl_trt.runtime.prompt import Conversation
    from qwen_vl_trt.runtime.request import Request

    ttft = {"off": [], "on": []}
    for r in range(args.repeat):
        image = photo(100 + r)
        messages, prompts, answers = [], [], []
        off = engine(model, args, False)
        for turn in range(args.turns):  # the conversation, its answers from the cache-off engine
            messages.append({"role": "user", "content": ([{"type": "image"}] if turn == 0 else []) +
                             [{"type": "text", "text": QUESTIONS[turn % len(QUESTIONS)]}]})
            prep = pre.prepare(Request(Conversation(tuple(messages)), (image,)))
            request = off.submit(seq(prep, args.new_tokens))
            off.run_until_idle()
            prompts.append(prep)
            answers.append(request)
            messages.append({"role": "assistant", "content": pre.tokenizer.decode(request.token_ids)})
        ttft["off"].append([_ttft(a) for a in answers])
        on = engine(model, args, True)
        times = []
        for prep, want in zip(prompts, answers):
            request = on.submit(seq(prep, args.new_tokens))
            on.run_until_idle()
            assert request.token_ids == want.token_ids, "the caches changed the tokens"
            times.append(_ttft(request))
        ttft["on"].append(times)
        stats = on.cache_stats()
    return {mode: np.median(np.array(v), axis=0) for mode, v in ttft.items()}, stats, [p.num_tokens for p in prompts]


def shared_system(model, pre, args) -> dict:
    from qwen_vl_trt.runtime.request import Request

    words = SYSTEM_WORDS
    while len(pre.tokenizer.encode(words)) < args.system_tokens:
        words += SYSTEM_WORDS
    system = pre.tokenizer.decode(pre.tokenizer.encode(words)[:args.system_tokens])
    preps = [pre.prepare(Request("Describe this image.", (photo(1000 + i),), system=system))
             for i in range(args.requests)]
    rounds = {"off": [], "on": []}
    for _ in range(args.repeat):
        tokens = {}
        for mode in ("off", "on"):
            eng = engine(model, args, mode == "on")
            t0 = time.perf_counter()
            reqs = [eng.submit(seq(p, args.new_tokens)) for p in preps]
            eng.run_until_idle()
            wall = time.perf_counter() - t0
            tokens[mode] = [r.token_ids for r in reqs]
            rounds[mode].append((len(reqs) / wall, sum(len(r.token_ids) for r in reqs) / wall, eng.cache_stats()))
        assert tokens["on"] == tokens["off"], "the caches changed the tokens"
    out = {}
    for mode, runs in rounds.items():
        req_s = [r[0] for r in runs]
        median = sorted(range(len(runs)), key=lambda i: req_s[i])[len(runs) // 2]
        out[mode] = (*runs[median][:2], runs[median][2], req_s)
    return out, preps[0].num_tokens


def _ttft(request) -> float:
    return 1e3 * (request.timings["first_token"] - request.timings["submitted"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--backend", default="onnxruntime", choices=("auto", "onnxruntime", "tensorrt"))
    ap.add_argument("--ort-graphs", default="fused", choices=("fused", "plugin"))
    ap.add_argument("--no-io-binding", action="store_true", help="ONNX Runtime with numpy I/O (chunked prefill)")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=500)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip", choices=("chat", "system"), default=None)
    args = ap.parse_args(argv)
    ensure_importable(ROOT)
    from qwen_vl_trt.runtime.generate import load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor

    model = load_model(args.model_dir, args.backend, ort_fused=args.ort_graphs == "fused",
                       io_binding=not args.no_io_binding)
    pre = Preprocessor(model.manifest)
    print(f"`python bench/bench_prefix_cache.py {' '.join(sys.argv[1:] if argv is None else argv)}`  \n"
          f"{utc_now()}; {machine()}; backend {model.backend}\n")
    if args.skip != "chat":
        ttft, stats, lengths = chat_ttft(model, pre, args)
        print("| turn | prompt tokens | TTFT off (ms) | TTFT on (ms) | on / off |\n|---|---|---|---|---|")
        for t in range(args.turns):
            off, on = ttft["off"][t], ttft["on"][t]
            print(f"| {t + 1} | {lengths[t]} | {off:.1f} | {on:.1f} | {on / off:.2f}x |")
        later = slice(1, args.turns)
        print(f"\nturns 2-{args.turns}: mean TTFT on / off = "
              f"{ttft['on'][later].mean() / ttft['off'][later].mean():.2f}x; last run's counters: {stats}\n")
    if args.skip != "system":
        out, tokens = shared_system(model, pre, args)
        print(f"| {args.requests} requests, {tokens}-token prompts | req/s | tok/s |\n|---|---|---|")
        for mode in ("off", "on"):
            print(f"| caches {mode} | {out[mode][0]:.2f} | {out[mode][1]:.1f} |")
        rounds = ", ".join(f"{on / off:.2f}x" for on, off in zip(out["on"][3], out["off"][3]))
        print(f"\nthroughput on / off = {out['on'][0] / out['off'][0]:.2f}x (median of {args.repeat} rounds; per "
              f"round: {rounds}); counters: {out['on'][2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
