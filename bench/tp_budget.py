"""Per-GPU memory of tensor-parallel exports (docs/large-models.md "Per-GPU budgets"), from the released configs.

    python bench/tp_budget.py [--markdown]

For every seed model (bench/make_random_checkpoint.py RELEASED) at TP 1/2/4/8: the decoder weight bytes one rank
holds, computed by applying the exporter's own split (export/tp.py `RankWeights.slice`) to torch `meta` tensors of
the released shapes (`parameter_shapes`: the HF model built on the meta device), so the table is what
`export_all --tp N` writes, not a hand formula. Weight formats: bf16 (2 bytes); FP8 e4m3 (1 byte + a bf16 scale
per 128 input rows of each output column: a 1-D blocked DequantizeLinear, +1.6 %); INT4 with
blocks of 128 (0.5 byte + a bf16 scale per 128: 0.516 bytes). Quantized formats apply to the decoder's linear
projections and experts; norms, router, lm_head stay bf16. Rank 0 also holds vision + embed (bf16). KV cache per
token per rank: 2 * L * Hkv_r * D * 2 bytes (bf16), Hkv_r = max(1, Hkv / TP). "fits H100" compares rank 0's
weights + 3 GiB of activations/workspace with 77.6 GiB (docs/large-models.md budget).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_random_checkpoint import RELEASED, parameter_shapes, released_config  # noqa: E402

GiB = 1 << 30
H100_GIB = 77.6
FORMAT_BYTES = {"bf16": 2.0, "fp8": 1.0 + 2 / 128, "int4-b128": 0.5 + 2 / 128}
_QUANTIZED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
              "up_proj.weight", "down_proj.weight", "experts.gate_up_proj", "experts.down_proj")


def budgets(name: str) -> list[dict]:
    import torch

    from qwen_vl_trt.export.tp import RankWeights, TensorParallel, check
    from qwen_vl_trt.model.errors import CheckpointError
    from qwen_vl_trt.model.spec import ModelSpec

    cfg = released_config(name)
    spec = ModelSpec.from_config(cfg)
    shapes = parameter_shapes(cfg)
    t = spec.text
    text = {k: s for k, s in shapes.items() if k.startswith("model.language_model.") or k.startswith("lm_head.")}
    if t.tie_word_embeddings:  # lm_head reads embed_tokens: the decoder holds it too
        text["lm_head.weight"] = shapes["model.language_model.embed_tokens.weight"]
    decoder = {k: s for k, s in text.items() if not k.endswith("embed_tokens.weight")}
    rank0_extra = sum(_numel(s) for k, s in shapes.items() if k not in decoder) * 2  # vision + embed, bf16
    rows = []
    for tp in (1, 2, 4, 8):
        try:
            check(spec, tp)
        except CheckpointError as e:
            rows.append({"model": name, "tp": tp, "error": str(e)})
            continue
        view = RankWeights(None, TensorParallel(0, tp), spec)
        per_format = {f: 0.0 for f in FORMAT_BYTES}
        for key, shape in decoder.items():
            n = _numel(view.slice(key, torch.empty(shape, device="meta")).shape)
            for f, b in FORMAT_BYTES.items():
                per_format[f] += n * (b if key.endswith(_QUANTIZED) else 2.0)
        hkv = max(1, t.num_key_value_heads // tp)
        rows.append({"model": name, "tp": tp, "decoder": per_format, "rank0_extra": rank0_extra,
                     "kv_per_token": 2 * t.num_hidden_layers * hkv * t.head_dim * 2})
    return rows


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def markdown(rows: list[dict]) -> str:
    fmts = list(FORMAT_BYTES)
    head = ("| model | TP | " + " | ".join(f"decoder / GPU, {f}" for f in fmts) + " | rank 0 adds (vision + embed) "
            "| KV / token / GPU | fits 1 x H100 per rank (bf16 / fp8 / int4) |")
    out = [head, "|" + "---|" * (len(fmts) + 5)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['tp']} | " + " | ".join("-" for _ in fmts) + f" | - | - | no split: {r['error'].split(': ', 2)[-1]} |")
            continue
        fits = "/".join("yes" if (r["decoder"][f] + r["rank0_extra"]) / GiB + 3 <= H100_GIB else "no" for f in fmts)
        out.append(f"| {r['model']} | {r['tp']} | " + " | ".join(f"{r['decoder'][f] / 1e9:.2f} GB" for f in fmts)
                   + f" | {r['rank0_extra'] / 1e9:.2f} GB | {r['kv_per_token'] / 1024:.0f} KiB | {fits} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(RELEASED))
    args = ap.parse_args(argv)
    rows = [r for name in args.models.split(",") for r in budgets(name)]
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
