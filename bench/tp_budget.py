"""Per-GPU memory of tensor-parallel exports in each weight format (docs/large-models.md "Per-GPU budgets"), from the
released configs.

    python bench/tp_budget.py [--models 235B-A22B] [--weights "dense;fp8;int4;attention=fp8,experts=int4"]

For every seed model (bench/make_random_checkpoint.py RELEASED) at TP 1/2/4/8: the decoder weight bytes rank 0
holds, by applying the exporter's own split (export/tp.py `RankWeights.slice`) to torch `meta` tensors of the
released shapes (`parameter_shapes`: the HF model built on the meta device), so the table is what
`export_all --tp N --weights MIX` writes, then the bytes per format of bench/weight_budget.py `linear_bytes` (bf16
graph: bf16 scales) on each rank's K x N, with the block a rank stores (export/tp.py):
- FP8 (a Qwen FP8 checkpoint, 128x128 blocks): a row-parallel layer (o_proj, down_proj, the experts' down) whose
  K/N is not a multiple of 128 is stored at the block gcd(128, K/N), one scale per block (235B-A22B at TP 8: the
  experts' 1536/8 = 192 rows in blocks of 64, +1.6 % -> +3.1 % scale bytes on those tensors);
- INT4: every rank must hold the 1-rank blocks (`check_formats`), so the block is the largest of 128/64/32/16 that
  divides every quantized row-parallel K/N (the `--int4-block-size` to export with; shown as `b64` etc.).
Rank 0 also holds vision + embed (bf16). KV cache per token per rank: 2 * L * Hkv_r * D * 2 bytes (bf16),
Hkv_r = max(1, Hkv / TP). "fits" compares rank 0's weights + 3 GiB of activations/workspace with 77.6 GiB (H100) and
139 GiB (H200).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_random_checkpoint import RELEASED, parameter_shapes, released_config  # noqa: E402
from weight_budget import H100_GIB, H200_GIB, WORKSPACE_GIB, linear_bytes  # noqa: E402

GiB = 1 << 30
MIXES = ("dense", "fp8", "int4", "attention=fp8,experts=int4")
INT4_BLOCKS = (128, 64, 32, 16)
_ROW_PARALLEL = ("o_proj.weight", "down_proj.weight", "experts.down_proj")


def budgets(name: str, mixes=MIXES) -> list[dict]:
    """Rows of the table for seed model `name` (its released config)."""
    return config_budgets(released_config(name), name, mixes)


def config_budgets(cfg: dict, name: str, mixes=MIXES, tps=(1, 2, 4, 8)) -> list[dict]:
    """Rows for any config.json dict `cfg` (tests/test_tp_quant.py checks them against exported rank graphs)."""
    import torch

    from qwen_vl_trt.export.tp import RankWeights, TensorParallel, check
    from qwen_vl_trt.model.errors import CheckpointError
    from qwen_vl_trt.model.spec import ModelSpec
    from qwen_vl_trt.model.weight_formats import WeightFormats

    spec = ModelSpec.from_config(cfg)
    shapes = parameter_shapes(cfg)
    t = spec.text
    text = {k: s for k, s in shapes.items() if k.startswith("model.language_model.") or k.startswith("lm_head.")}
    if t.tie_word_embeddings:  # lm_head reads embed_tokens: the decoder holds it too
        text["lm_head.weight"] = shapes["model.language_model.embed_tokens.weight"]
    decoder = {k: s for k, s in text.items() if not k.endswith("embed_tokens.weight")}
    rank0_extra = sum(math.prod(s) for k, s in shapes.items() if k not in decoder) * 2  # vision + embed, bf16
    rows = []
    for tp in tps:
        try:
            check(spec, tp)
        except CheckpointError as e:
            rows.append({"model": name, "tp": tp, "error": str(e)})
            continue
        view = RankWeights(None, TensorParallel(0, tp), spec)
        tensors = []  # (key, group, E, K, N) of rank 0
        for key, shape in decoder.items():
            sliced = tuple(view.slice(key, torch.empty(shape, device="meta")).shape)
            if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):  # HF in-memory [E, N, K]
                tensors.append((key, "experts", sliced[0], sliced[2], sliced[1]))
            elif key.endswith(".weight") and len(sliced) == 2:
                group = WeightFormats().group_of(key.rsplit(".weight", 1)[0])
                tensors.append((key, group or "other", 1, sliced[1], sliced[0]))
            else:
                tensors.append((key, "other", 1, 1, math.prod(sliced)))
        per_mix = {}
        for mix in mixes:
            formats = WeightFormats.parse(mix)
            split_k = [k for key, g, _, k, _ in tensors if tp > 1 and key.endswith(_ROW_PARALLEL)
                       and g != "other" and getattr(formats, g) == "int4"]
            block = next((b for b in INT4_BLOCKS if all(k % b == 0 for k in split_k)), None)
            if block is None:
                per_mix[mix] = None
                continue
            total = 0
            for key, group, e, k, n in tensors:
                fmt = "dense" if group == "other" else getattr(formats, group)
                fp8_block = math.gcd(128, k) if tp > 1 and key.endswith(_ROW_PARALLEL) else 128
                total += e * linear_bytes(k, n, fmt, 2, block, fp8_block)
            per_mix[mix] = (total, block if formats.uses_int4 else None)
        hkv = max(1, t.num_key_value_heads // tp)
        rows.append({"model": name, "tp": tp, "decoder": per_mix, "rank0_extra": rank0_extra,
                     "kv_per_token": 2 * t.num_hidden_layers * hkv * t.head_dim * 2, "moe": t.moe is not None})
    return rows


def markdown(rows: list[dict], mixes=MIXES) -> str:
    head = ("| model | TP | " + " | ".join(f"decoder / GPU, `{m}`" for m in mixes) + " | rank 0 adds (vision + embed) "
            "| KV / token / GPU | rank 0 fits 1 x H100 / 1 x H200 (per column) |")
    out = [head, "|" + "---|" * (len(mixes) + 5)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['tp']} | " + " | ".join("-" for _ in mixes)
                       + f" | - | - | no split: {r['error'].split(': ', 2)[-1]} |")
            continue
        cells, fits = [], []
        for mix in mixes:
            got = r["decoder"][mix]
            if got is None or (mix == "attention=fp8,experts=int4" and not r["moe"]):
                cells.append("-")
                fits.append("-")
                continue
            total, block = got
            cells.append(f"{total / 1e9:.2f} GB" + (f" (b{block})" if block and block != 128 else ""))
            need = (total + r["rank0_extra"]) / GiB + WORKSPACE_GIB
            fits.append("/".join("yes" if need <= cap else "no" for cap in (H100_GIB, H200_GIB)))
        out.append(f"| {r['model']} | {r['tp']} | " + " | ".join(cells) + f" | {r['rank0_extra'] / 1e9:.2f} GB | "
                   f"{r['kv_per_token'] / 1024:.0f} KiB | {', '.join(fits)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(RELEASED))
    ap.add_argument("--weights", default=";".join(MIXES), help="mixes separated by ';'")
    args = ap.parse_args(argv)
    mixes = tuple(args.weights.split(";"))
    rows = [r for name in args.models.split(",") for r in budgets(name, mixes)]
    print(markdown(rows, mixes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
