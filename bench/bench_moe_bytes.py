"""MoE decode cost: bytes of expert weights read per token vs the active-parameter count (a script).

  python bench/bench_moe_bytes.py [--config 30B-A3B] [--layers 3] [--batch 1 4 16] [--prompt 128] [--steps 3]
                                  [--work /tmp/qwen-vl-moe-bench] [--keep] [--analytic-only]
  python bench/bench_moe_bytes.py --expert-formats [--plugins build/plugins/libqwen_vl_plugins.so]

Part 1, analytic, for the full released 30B-A3B and 235B-A22B configs (bf16 weights): parameters per token
(attention, router, the k selected experts, lm_head, one embedding row) vs the experts' share, the bytes a
decode token must read, and the dense alternative (every expert), as formulas over config.json values.

Part 2, measured on ONNX Runtime CPU: a random-weight checkpoint with the released config reduced to
--layers text layers (bench/make_random_checkpoint.py), its decoder.onnx exported in fp32 (ORT CPU has no
bf16 MatMul), a prefill of --prompt tokens per sequence, then --steps decode steps, at each --batch. ORT's
profiler gives each node's output bytes, also inside the experts' Loop body; the expert weights read are the
outputs of the Gather nodes whose data input is an expert initializer (gate_up_proj / down_proj): exactly the
weight slices the step reads. Printed per decode token next to k * 3 * C * I * 4 bytes * layers (the selected
experts, fp32) and per prefill step next to one read of every expert and to per-token copies.

Part 3 (`--expert-formats`, instead of 1-2), quantized experts (export/moe_quant.py): a random Qwen3-VL-MoE (the
tiny test model widened: C 512, I 192 (2I != C: HF tells the expert layouts apart by shape), 32 experts, top-8,
4 text layers of which 3 sparse), its bf16 decoder.onnx with the experts dense / FP8 (block 128) / INT4 (block 64,
dividing I), the experts' bytes in decoder.onnx.data, and the TensorRT-RTX engine (AOT, SM89 + SM120) built with
the plugin library when given (MoEExperts reads the quantized tensors) or from the inlined reference bodies: total
engine bytes and the difference to the dense engine.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_export_memory import machine  # noqa: E402
from make_random_checkpoint import released_config, write_checkpoint  # noqa: E402

GB = 1e9
H100_HBM = 3.35e12  # H100 SXM HBM3 bytes/s (datasheet), for a weights-only lower bound per decode token


def counts(cfg: dict) -> dict:
    """Parameter counts of the text model from config.json values (per layer unless noted)."""
    t = cfg["text_config"]
    c, d, hq, hkv = t["hidden_size"], t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    e, k, i, v = t["num_experts"], t["num_experts_per_tok"], t["moe_intermediate_size"], t["vocab_size"]
    return {
        "layers": t["num_hidden_layers"], "C": c, "I": i, "E": e, "k": k, "V": v,
        "attention": c * hq * d + 2 * c * hkv * d + hq * d * c + 2 * d + 2 * c,  # q,k,v,o + q/k norm + 2 RMSNorms
        "router": e * c,
        "expert": 3 * c * i,  # gate + up [C, 2I], down [I, C]
        "lm_head": v * c, "embed": v * c,
    }


def analytic(name: str) -> str:
    """One row: active = L (attention + router + k experts) + lm_head + final norm + one embedding row."""
    n = counts(released_config(name))
    layers, e, k = n["layers"], n["E"], n["k"]
    experts_active = layers * k * n["expert"]
    active = layers * (n["attention"] + n["router"]) + experts_active + n["lm_head"] + 2 * n["C"]
    total = layers * (n["attention"] + n["router"] + e * n["expert"]) + n["lm_head"] + n["embed"] + n["C"]
    return (f"| {name} | {total / 1e9:.1f} B | {active / 1e9:.2f} B | {experts_active / 1e9:.2f} B "
            f"({experts_active / active:.0%}) | {2 * n['expert'] * k / 1e6:.1f} MB | {2 * experts_active / GB:.2f} GB "
            f"| {2 * active / GB:.2f} GB | {2 * active / H100_HBM * 1e3:.2f} ms | "
            f"{2 * (active - experts_active + layers * e * n['expert']) / GB:.1f} GB ({e // k}x experts) |")


def expected_distinct(e: int, k: int, batch: int) -> float:
    """Experts hit per layer by `batch` tokens under uniform routing: E (1 - (1 - k/E)^B)."""
    return e * (1 - (1 - k / e) ** batch)


def expert_gathers(onnx_path: Path) -> set[str]:
    """Names of the Gather nodes (in any subgraph) whose data input is an expert weight initializer."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    experts = {t.name for t in model.graph.initializer if t.name.endswith((".experts.gate_up_proj",
                                                                            ".experts.down_proj"))}
    found, graphs = set(), [model.graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            if node.op_type == "Gather" and node.input[0] in experts:
                found.add(node.name)
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return found


def runs_from_profile(path: str, gathers: set[str]) -> list[dict]:
    """Per model_run: wall time and the bytes the expert-weight Gathers produced (= weight bytes read)."""
    events = json.loads(Path(path).read_text())
    runs = [{"ts": e["ts"], "end": e["ts"] + e["dur"], "dur_s": e["dur"] / 1e6, "bytes": 0, "gathers": 0}
            for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if e["name"][:-len("_kernel_time")] in gathers:
            run = next(r for r in runs if r["ts"] <= e["ts"] <= r["end"])
            run["bytes"] += int(e["args"]["output_size"])
            run["gathers"] += 1
    return runs


def feeds_for(sess, batch: int, seq: int, past: int, cache: dict, rng) -> dict:
    """Random hidden states (RMSNorm makes their scale irrelevant), text positions, the running cache."""
    c = sess.get_inputs()[0].shape[2]
    feeds = {"inputs_embeds": rng.standard_normal((batch, seq, c), dtype=np.float32),
             "position_ids": np.broadcast_to(np.arange(past, past + seq), (3, batch, seq)).copy(),
             "past_lengths": np.full(batch, past, np.int64), "logits_index": np.full(batch, seq - 1, np.int64)}
    names = {i.name for i in sess.get_inputs()}
    if "deepstack_embeds" in names:
        feeds["deepstack_embeds"] = np.zeros((3, batch, seq, c), np.float32)
    return {**feeds, **cache}


def measure(decoder: Path, batches, prompt: int, steps: int, cfg: dict) -> list[dict]:
    import onnxruntime as ort

    t = cfg["text_config"]
    results = []
    for batch in batches:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(decoder.parent / f"profile_b{batch}")
        sess = ort.InferenceSession(str(decoder), opts, providers=["CPUExecutionProvider"])
        shape = (batch, t["num_key_value_heads"], prompt + steps + 1, t["head_dim"])
        cache = {f"past_{kv}.{i}": np.zeros(shape, np.float32)
                 for i in range(t["num_hidden_layers"]) for kv in ("key", "value")}
        rng = np.random.default_rng(batch)
        for step in range(steps + 1):
            seq, past = (prompt, 0) if step == 0 else (1, prompt + step - 1)
            out = sess.run(None, feeds_for(sess, batch, seq, past, cache, rng))
            names = [o.name for o in sess.get_outputs()]
            cache = {n.replace("present", "past"): v for n, v in zip(names, out) if n.startswith("present")}
        runs = runs_from_profile(sess.end_profiling(), expert_gathers(decoder))
        results.append({"batch": batch, "prefill": runs[0], "decode": runs[1:]})
        print(f"  batch {batch}: {len(runs)} runs profiled", file=sys.stderr, flush=True)
    return results


def report(results: list[dict], cfg: dict, prompt: int) -> list[str]:
    n = counts(cfg)
    layers, e, k, slice4 = n["layers"], n["E"], n["k"], 4 * n["expert"]  # one expert's weights, fp32 bytes
    active4 = layers * k * slice4  # the selected experts' bytes per decode token, fp32
    rows = ["| batch | step | tokens | expert weight bytes read (fp32) | per token | per token / (k experts x "
            "layers) | experts read per layer | uniform-routing expectation | bf16 per token | step s (ORT CPU) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = r["batch"]
        for step, run in [("decode", d) for d in r["decode"]]:
            per_tok = run["bytes"] / b
            rows.append(f"| {b} | {step} | {b} | {run['bytes'] / GB:.3f} GB | {per_tok / GB:.3f} GB | "
                        f"{per_tok / active4:.3f} | {run['bytes'] / slice4 / layers:.1f} | "
                        f"{expected_distinct(e, k, b):.1f} | {per_tok / 2 / GB:.3f} GB | {run['dur_s']:.2f} |")
        p = r["prefill"]
        tokens = b * prompt
        rows.append(f"| {b} | prefill | {tokens} | {p['bytes'] / GB:.3f} GB | {p['bytes'] / tokens / GB:.4f} GB | "
                    f"{p['bytes'] / tokens / active4:.3f} | {p['bytes'] / slice4 / layers:.1f} (per-token copies "
                    f"would be {tokens * k}) | {expected_distinct(e, k, tokens):.1f} | - | {p['dur_s']:.2f} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="30B-A3B", choices=["30B-A3B", "235B-A22B"])
    ap.add_argument("--layers", type=int, default=3, help="text layers kept (>= 3: the DeepStack levels)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompt", type=int, default=128, help="prefill tokens per sequence")
    ap.add_argument("--steps", type=int, default=3, help="decode steps after the prefill")
    ap.add_argument("--work", default="/tmp/qwen-vl-moe-bench")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the graph")
    ap.add_argument("--analytic-only", action="store_true")
    ap.add_argument("--expert-formats", action="store_true", help="part 3 only: quantized experts' graph/engine bytes")
    ap.add_argument("--plugins", default=None, help="plugin library for part 3's engines (default: reference bodies)")
    args = ap.parse_args(argv)
    if args.expert_formats:
        print("\n".join(expert_formats(Path(args.work), args.plugins)))
        print(f"\nbench: python bench/bench_moe_bytes.py {' '.join(argv if argv is not None else sys.argv[1:])}")
        print(f"machine: {machine()}")
        print(f"date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
        return 0

    print("| model | total params | active params / token | of which experts | k experts per layer (bf16) "
          "| expert bytes / decode token (bf16) | all weight bytes / decode token (bf16) | H100 HBM bound "
          "| dense alternative / token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("30B-A3B", "235B-A22B"):
        print(analytic(name))
    if not args.analytic_only:
        print()
        cfg = released_config(args.config)
        cfg["text_config"]["num_hidden_layers"] = args.layers
        results = run_measurement(cfg, args)
        print("\n".join(report(results, cfg, args.prompt)))
    print()
    print(f"bench: python bench/bench_moe_bytes.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {machine()}")
    print(f"date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    return 0


def expert_formats(work: Path, plugins: str | None) -> list[str]:
    """Part 3: per experts format, bf16 decoder expert bytes (ONNX) and TensorRT-RTX engine bytes."""
    import subprocess

    import onnx

    from qwen_vl_trt.export.decoder import export_decoder
    from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_MOE_TINY, make_checkpoint
    from qwen_vl_trt.export.weights import CheckpointWeights
    from qwen_vl_trt.model.spec import ModelSpec
    from qwen_vl_trt.model.trt_compat import rtx_env
    from qwen_vl_trt.model.weight_formats import WeightFormats

    text = {**QWEN3_VL_MOE_TINY["text_config"], "hidden_size": 512, "moe_intermediate_size": 192, "num_experts": 32,
            "num_experts_per_tok": 8}
    vision = {**QWEN3_VL_MOE_TINY["vision_config"], "out_hidden_size": 512}
    ckpt = make_checkpoint(work / "ckpt-expert-formats", "qwen3_vl_moe", seed=7,
                           config_overrides={"text_config": text, "vision_config": vision})
    spec = ModelSpec.from_checkpoint(ckpt)
    rows = ["| experts | expert bytes in decoder.onnx.data | vs dense | decoder.onnx.data | engine (SM89+SM120, "
            f"{'plugin' if plugins else 'reference bodies'}) | engine vs dense |", "|---|---|---|---|---|---|"]
    dense = {}
    for fmt in ("dense", "fp8", "int4"):
        out = work / f"decoder-{fmt}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_bytes((ckpt / "config.json").read_bytes())
        export_decoder(spec, CheckpointWeights(ckpt), out, "bfloat16",
                       formats=WeightFormats.parse(f"experts={fmt}", int4_block=64))
        model = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
        experts = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in model.graph.initializer
                      if ".experts." in t.name)
        flags = ["--plugins", plugins] if plugins else []
        r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.build_engines", str(out), "--graphs", "decoder",
                            "--dtype", "bfloat16", "--max-batch", "2", "--max-seq", "256", "--max-cache-len", "512",
                            "--compute-capabilities", "8.9", "12.0", *flags],
                           capture_output=True, text=True, env=rtx_env(), timeout=1800)
        if r.returncode != 0:
            raise SystemExit(f"engine build failed for experts={fmt}: {r.stderr[-2000:]}")
        engine = (out / "decoder.engine").stat().st_size
        dense.setdefault("experts", experts)
        dense.setdefault("engine", engine)
        rows.append(f"| {fmt} | {experts / 1e6:.2f} MB | {experts / dense['experts']:.3f}x | "
                    f"{(out / 'decoder.onnx.data').stat().st_size / 1e6:.1f} MB | {engine / 1e6:.1f} MB | "
                    f"{(engine - dense['engine']) / 1e6:+.1f} MB |")
        print(f"  experts={fmt}: built", file=sys.stderr, flush=True)
    return rows


def run_measurement(cfg: dict, args) -> list[dict]:
    from qwen_vl_trt.export.cli import export_graphs

    work = Path(args.work)
    ckpt, out = work / f"ckpt-{args.config}-L{args.layers}", work / f"onnx-{args.config}-L{args.layers}"
    try:
        if not (ckpt / "model.safetensors.index.json").is_file():
            t0 = time.perf_counter()
            write_checkpoint(cfg, ckpt, "bf16", progress=lambda m: print(m, file=sys.stderr))
            print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if not (out / "decoder.onnx").is_file():
            t0 = time.perf_counter()
            export_graphs(ckpt, out, "fp32", graphs=("decoder",))
            print(f"decoder.onnx (fp32) exported in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return measure(out / "decoder.onnx", args.batch, args.prompt, args.steps, cfg)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
