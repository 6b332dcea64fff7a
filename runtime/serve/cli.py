"""`trt-run`: generate text from images / a video and a prompt with exported artifacts (argparse -> RunConfig of
typed requests, runtime/request.py -> generate). Text streams to stdout as tokens arrive and timings go to
stderr; `--json` prints one object. Bad input or artifacts: one line `error: ...` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from qwen_vl_trt.model.errors import UserError

from ..request import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MEDIA_PROMPT, FieldError, Request, Sampling, prompt_or_default


@dataclass(frozen=True)
class RunConfig:
    model_dir: str
    requests: tuple  # Request per --prompt (runtime/request.py), each with the same media and settings
    backend: str
    json: bool
    ort_graphs: str = "fused"
    device: str = "auto"
    int4_activations: str | None = None  # None: manifest.json's (model/weight_formats.py)
    ort_cache: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        media = bool(args.image) or args.video is not None
        prompts = tuple(args.prompt or ()) or (prompt_or_default(None, media, "pass --prompt TEXT, --image PATH or "
                                                                              "--video PATH"),)
        try:
            sampling = Sampling(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed)
            requests = tuple(Request(p, tuple(args.image or ()), args.video, args.system, args.max_new_tokens,
                                     sampling, ignore_eos=args.ignore_eos) for p in prompts)
        except FieldError as e:  # the rule is the request's; the name is the flag's
            raise UserError(f"--{e.field.replace('_', '-')} {e.value}: must be {e.need}") from None
        return cls(args.model_dir, requests, args.backend, args.json, args.ort_graphs, args.device,
                   args.int4_activations, getattr(args, "ort_cache", None))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trt-run", description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="artifacts", help="artifact directory from export_all.sh (default: artifacts)")
    ap.add_argument("--image", action="append", help="image file; repeat for several images")
    ap.add_argument("--video", help="video file (needs PyAV) or a directory of frame images")
    ap.add_argument("--prompt", action="append",
                    help=f"user text (default with media: {DEFAULT_MEDIA_PROMPT!r}); repeat for several prompts, each "
                         "with the same media, generated with in-flight batching (any number of prompts)")
    ap.add_argument("--system", help="system message")
    ap.add_argument("--max-new-tokens", type=int, help=f"default: generation_config.json, else {DEFAULT_MAX_NEW_TOKENS}")
    ap.add_argument("--temperature", type=float, help="0 = greedy; default from generation_config.json")
    ap.add_argument("--top-p", type=float, help="default from generation_config.json")
    ap.add_argument("--top-k", type=int, help="default from generation_config.json")
    ap.add_argument("--repetition-penalty", type=float,
                    help="HF's repetition penalty, also when greedy (1 = off); default from generation_config.json")
    ap.add_argument("--seed", type=int, help="seed of the sampler")
    ap.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")
    ap.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto",
                    help="auto: TensorRT engines when present and runnable, else ONNX Runtime")
    ap.add_argument("--ort-graphs", choices=("fused", "plugin"), default="fused",
                    help="ONNX Runtime backend: fused = vision/decoder.ort.onnx (ONNX Runtime's attention and rotary "
                         "kernels, in-place KV cache; default), plugin = the graphs TensorRT builds (reference bodies)")
    ap.add_argument("--device", choices=("auto", "cuda"), default="auto",
                    help="auto: ONNX Runtime's CUDA provider when it loads, else the CPU (the timing line says which); "
                         "cuda: fail with one line instead of falling back to the CPU")
    ap.add_argument("--int4-activations", choices=("fp32", "int8"),
                    help="ONNX Runtime, INT4 weights: fp32 = MatMulNBits accuracy level 1 (the exact product), int8 = "
                         "level 4 (activations rounded to int8: faster on CPUs, lossy); default: what the export "
                         "recorded in manifest.json (--int4-activations of export_all.sh)")
    ap.add_argument("--ort-cache", metavar="DIR",
                    help="ONNX Runtime backend: keep ONNX Runtime's optimized graphs in DIR and load them from there "
                         "on later starts (keyed on the graph files, ONNX Runtime's version, providers and options)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return ap


def run(cfg: RunConfig, out=sys.stdout, err=sys.stderr) -> list:
    from ..backends.ort_cuda import providers_line, require_cuda_provider, require_on_gpu
    from ..generate import generate, load_model
    from ..pipeline import Preprocessor
    from ..prompt import IncrementalDecoder
    from ..sampling import Sampler
    from ..scheduler import generate_inflight

    if cfg.device == "cuda" and cfg.backend == "onnxruntime":
        require_cuda_provider()  # seconds, before loading the graphs
    model = load_model(cfg.model_dir, cfg.backend, ort_fused=cfg.ort_graphs == "fused",
                       int4_activations=cfg.int4_activations, ort_cache=cfg.ort_cache)
    if cfg.device == "cuda":
        require_on_gpu(model.sessions)
    pre = Preprocessor(model.manifest)
    requests = [pre.prepare(r) for r in cfg.requests]
    gen, first = model.manifest.generation_config, cfg.requests[0]  # every request has these settings
    sampling, max_new = first.sampling.config(gen), first.new_tokens(gen)
    stream = None
    if not cfg.json and len(requests) == 1:
        decoder = IncrementalDecoder(pre.tokenizer)
        stream = lambda b, tok: out.write(decoder.push(tok)) or out.flush()  # noqa: E731
    if len(requests) == 1:
        results = generate(model, requests, Sampler(sampling), max_new, eos_token_ids=model.manifest.eos_token_ids,
                           ignore_eos=first.ignore_eos, on_token=stream)
    else:  # several prompts: in-flight batching, each takes a free slot as soon as one ends (runtime/scheduler.py)
        results = generate_inflight(model, requests, sampling, max_new, ignore_eos=first.ignore_eos)
    texts = [pre.tokenizer.decode(r.token_ids) for r in results]
    if cfg.json:
        obj = [{"text": t, "token_ids": r.token_ids, "prompt_tokens": r.prompt_tokens, "timings": r.timings}
               for t, r in zip(texts, results)]
        if len(obj) == 1:
            out.write(json.dumps(obj[0], ensure_ascii=False) + "\n")
        else:
            out.write(json.dumps({k: [o[k] for o in obj] for k in obj[0]}, ensure_ascii=False) + "\n")
        return results
    if stream is not None:
        out.write(decoder.flush() + "\n")
    else:
        for i, t in enumerate(texts):
            out.write(f"[{i}] {t}\n")
    for i, r in enumerate(results):
        err.write(_timing_line(i if len(results) > 1 else None, r) + f" | {providers_line(model.sessions)}\n")
    return results


def _timing_line(index, result) -> str:
    t = result.timings
    head = f"[{index}] " if index is not None else ""
    rate = f"{t['decode_tok_per_s']} tok/s" if t["decode_tok_per_s"] is not None else "n/a"
    return (f"{head}{t['backend']}: prompt {result.prompt_tokens} tokens | preprocess {t['preprocess_ms']} ms | "
            f"vision {t['vision_ms']} ms | prefill {t['prefill_ms']} ms | TTFT {t['ttft_ms']} ms | "
            f"{len(result.token_ids)} tokens, decode {rate}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        run(RunConfig.from_args(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
