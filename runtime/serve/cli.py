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
    ort_cache: str | bool | None = None  # a folder; None: the default cache (runtime/backends/loader.py); False: off
    ort_prepack: bool = True  # False (--ort-weights mapped): dense weights used where they are memory-mapped
    int4_kernel: str = "auto"  # --int4-kernel: auto (qwen_vl::MatMulInt4 where it runs) | mlas
    dense_kernel: str = "auto"  # --dense-kernel: auto (qwen_vl::MatMulF32 where it runs) | mlas

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        media = bool(args.image) or args.video is not None
        prompts = tuple(args.prompt or ()) or (prompt_or_default(None, media, "pass --prompt TEXT, --image PATH or "
                                                                              "--video PATH"),)
        grammar = _grammar(args)
        try:
            sampling = Sampling(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed,
                                min_p=args.min_p, min_tokens=args.min_tokens, logprobs=args.logprobs)
            requests = tuple(Request(p, tuple(args.image or ()), args.video, args.system, args.max_new_tokens,
                                     sampling, ignore_eos=args.ignore_eos, grammar=grammar) for p in prompts)
        except FieldError as e:  # the rule is the request's; the name is the flag's
            raise UserError(f"--{e.field.replace('_', '-')} {e.value}: must be {e.need}") from None
        return cls(args.model_dir, requests, args.backend, args.json, args.ort_graphs, args.device,
                   args.int4_activations, _ort_cache(getattr(args, "ort_cache", None)),
                   getattr(args, "ort_weights", "prepacked") == "prepacked", getattr(args, "int4_kernel", "auto"),
                   getattr(args, "dense_kernel", "auto"))


def _ort_cache(value: str | None):
    """--ort-cache DIR | off -> the folder, False (no cache), or None (the default cache)."""
    return False if value == "off" else value


def _grammar(args: argparse.Namespace):
    """--json-schema FILE / --regex PATTERN -> a runtime/structured.py Grammar, or None."""
    from ..structured import Grammar

    if args.json_schema is not None and args.regex is not None:
        raise UserError("--json-schema and --regex: give one of them")
    if args.regex is not None:
        return Grammar("regex", args.regex)
    if args.json_schema is None:
        return None
    try:
        schema = json.loads(open(args.json_schema, encoding="utf-8").read())
    except OSError as e:
        raise UserError(f"--json-schema {args.json_schema}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"--json-schema {args.json_schema}: not JSON ({e})") from None
    return Grammar("json_schema", json.dumps(schema))


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
    ap.add_argument("--min-p", type=float, help="drop tokens below min_p x the top token's probability (HF's min_p)")
    ap.add_argument("--min-tokens", type=int, help="EOS is held back until this many tokens were generated")
    ap.add_argument("--logprobs", type=int, metavar="N",
                    help="with --json: each token's log-probability (raw logits) and the N most likely tokens'")
    ap.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid against this JSON schema file")
    ap.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression")
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
    ap.add_argument("--ort-cache", metavar="DIR|off",
                    help="ONNX Runtime backend: keep ONNX Runtime's optimized graphs in DIR and load them from there "
                         "on later starts (keyed on the graph files, ONNX Runtime's version, providers and options); "
                         "default on the CPU: an INT4 decoder's optimized graph, or a dense decoder's graph ordered "
                         "for a lower peak memory, in ARTIFACTS/.ort-cache (or the user's cache folder when ARTIFACTS "
                         "is read-only); off: no cache")
    ap.add_argument("--ort-weights", choices=("prepacked", "mapped"), default="prepacked",
                    help="ONNX Runtime on the CPU, dense weights of vision, embed and (with --dense-kernel mlas) the "
                         "decoder: prepacked = copied into MLAS's packed layout at start-up (seconds of start-up for "
                         "GB of weights), mapped = used where they are memory-mapped from the .onnx.data files (no "
                         "copy, shared page cache; MLAS's steps slower: docs/benchmarks.md). A dense fp32 decoder on "
                         "MatMulF32 (--dense-kernel auto) is always mapped; an INT4 decoder is never")
    ap.add_argument("--int4-kernel", choices=("auto", "mlas"), default="auto",
                    help="ONNX Runtime on the CPU, INT4 weights with fp32 activations: auto = our MatMulInt4 kernel "
                         "(build/ort/libqwen_vl_ort_kernels.so, AVX-512; needs the optimized-graph cache) where it "
                         "runs, else ONNX Runtime's MatMulNBits; mlas = always MatMulNBits")
    ap.add_argument("--dense-kernel", choices=("auto", "mlas"), default="auto",
                    help="ONNX Runtime on the CPU, a dense fp32 decoder: auto = our MatMulF32 kernel on the weights "
                         "where they are memory-mapped (start-up without ONNX Runtime's weight copy, decode at the "
                         "memory bandwidth; build/ort/libqwen_vl_ort_kernels.so, AVX-512) where it runs; mlas = "
                         "ONNX Runtime's MatMul / Gemm (weights as --ort-weights says)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return ap


def run(cfg: RunConfig, out=sys.stdout, err=sys.stderr) -> list:
    from ..backends.ort_cuda import providers_line, require_cuda_provider, require_on_gpu
    from ..generate import generate
    from ..prompt import IncrementalDecoder
    from ..sampling import Sampler
    from ..scheduler import generate_inflight

    if cfg.device == "cuda" and cfg.backend == "onnxruntime":
        require_cuda_provider()  # seconds, before loading the graphs
    from ..startup import load_model_and_preprocessor

    model, pre = load_model_and_preprocessor(cfg.model_dir, cfg.backend, ort_fused=cfg.ort_graphs == "fused",
                                             int4_activations=cfg.int4_activations, ort_cache=cfg.ort_cache,
                                             ort_prepack=cfg.ort_prepack, int4_kernel=cfg.int4_kernel,
                                             dense_kernel=cfg.dense_kernel)
    if cfg.device == "cuda":
        require_on_gpu(model.sessions)
    requests = [pre.prepare(r) for r in cfg.requests]
    gen, first = model.manifest.generation_config, cfg.requests[0]  # every request has these settings
    sampling, max_new = first.sampling.config(gen), first.new_tokens(gen)
    stream = None
    if not cfg.json and len(requests) == 1:
        decoder = IncrementalDecoder(pre.tokenizer)
        stream = lambda b, tok: out.write(decoder.push(tok)) or out.flush()  # noqa: E731
    constraints = None
    if first.grammar is not None:  # one grammar matcher per prompt (runtime/structured.py)
        from ..structured import Grammars

        grammars = Grammars(pre.tokenizer, model.spec.text.vocab_size, model.manifest.eos_token_ids)
        constraints = [grammars.constraint(r.grammar) for r in cfg.requests]
    if len(requests) == 1:
        sampler = Sampler(sampling, model.manifest.eos_token_ids, constraints[0] if constraints else None)
        logprobs = []

        def on_token(b: int, tok: int) -> None:
            if sampler.last_logprobs is not None:
                logprobs.append(sampler.last_logprobs[b])
            if stream is not None:
                stream(b, tok)

        results = generate(model, requests, sampler, max_new, eos_token_ids=model.manifest.eos_token_ids,
                           ignore_eos=first.ignore_eos, on_token=on_token)
        results[0].logprobs = logprobs
    else:  # several prompts: in-flight batching, each takes a free slot as soon as one ends (runtime/scheduler.py)
        results = generate_inflight(model, requests, sampling, max_new, ignore_eos=first.ignore_eos,
                                    constraints=constraints)
    texts = [pre.tokenizer.decode(r.token_ids) for r in results]
    if cfg.json:
        obj = [{"text": t, "token_ids": r.token_ids, "prompt_tokens": r.prompt_tokens, "timings": r.timings}
               for t, r in zip(texts, results)]
        if sampling.logprobs is not None:
            for o, r in zip(obj, results):
                o["logprobs"] = [{"token_id": e.token, "logprob": e.logprob, "top": [list(t) for t in e.top]}
                                 for e in r.logprobs]
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
