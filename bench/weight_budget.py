"""Decoder weight bytes per group for any WeightFormats mix (docs/large-models.md "Weight bytes per format"), from the
released configs' shapes (bench/make_random_checkpoint.py RELEASED + parameter_shapes: the HF model on the meta
device), at TP 1.

    python bench/weight_budget.py [--models 235B-A22B] [--weights dense,fp8,int4,attention=fp8,experts=int4]

Bytes per weight of K input features and N output features (the layouts of export/fp8.py, export/int4.py,
export/int8.py; a scale is one element of the graph dtype, `dtype_bytes`):
- dense: K * N * dtype_bytes;
- fp8: K * N * 1 + ceil(K / 128) * N scales (one per 128 rows of each output column);
- int4: K * N / 2 + K / block * N scales; a Linear whose K is not a multiple of the block stays dense
  (export/int4.py `quantizes`; every K of the released configs is a multiple of 128);
- int8 (lm_head only): K * N * 1 + N scales (per output channel).
Groups as model/weight_formats.py: attention = self_attn.{q,k,v,o}_proj, mlp = a dense MLP's {gate,up,down}_proj,
experts = the stacked experts (stored [E, K, N]), lm_head = lm_head (the embedding table when tied); `other` (norms,
router) stays dense. The embedding table itself (embed.onnx) and the vision tower are not decoder weights.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_random_checkpoint import RELEASED, parameter_shapes, released_config  # noqa: E402

GiB = 1 << 30
H100_GIB = 77.6  # usable per GPU (docs/large-models.md)
H200_GIB = 139.0
WORKSPACE_GIB = 3.0  # activations / workspace per GPU, as bench/tp_budget.py
DEFAULT_MIXES = ("dense", "fp8", "int4", "attention=fp8,experts=int4")


def linear_bytes(k: int, n: int, fmt: str, dtype_bytes: int = 2, int4_block: int = 128, fp8_block: int = 128) -> int:
    """Bytes of one K x N weight in `fmt` (module docstring; `fp8_block` < 128: a tensor-parallel rank's slice of
    128-blocks cut mid-block, bench/tp_budget.py)."""
    if fmt == "dense":
        return k * n * dtype_bytes
    if fmt == "fp8":
        return k * n + math.ceil(k / fp8_block) * n * dtype_bytes
    if fmt == "int4" and k % int4_block:
        return k * n * dtype_bytes
    if fmt == "int4":
        return k * n // 2 + k // int4_block * n * dtype_bytes
    if fmt == "int8":
        return k * n + n * dtype_bytes
    raise ValueError(fmt)


def group_bytes(cfg: dict, formats, dtype_bytes: int = 2) -> dict[str, int]:
    """{group: bytes} of the decoder of config `cfg` (a config.json dict) in `formats` (a WeightFormats)."""
    shapes = parameter_shapes(cfg)
    text = cfg.get("text_config", cfg)
    tied = text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    if tied:
        shapes["lm_head.weight"] = next(s for k, s in shapes.items()
                                        if k.endswith("language_model.embed_tokens.weight"))
    out: dict[str, int] = {}
    for key, shape in shapes.items():
        if "language_model." not in key and not key.startswith("lm_head."):
            continue  # vision tower
        if key.endswith("embed_tokens.weight"):
            continue  # embed.onnx
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):  # [E, K, N] as stored
            group = "experts"
            e, k, n = shape
            b = e * linear_bytes(k, n, formats.experts, dtype_bytes, formats.int4_block)
        else:
            group = formats.group_of(key.rsplit(".weight", 1)[0]) if key.endswith(".weight") else None
            if group is None or len(shape) != 2:
                group, b = "other", math.prod(shape) * dtype_bytes
            else:  # nn.Linear weight [N, K]
                b = linear_bytes(shape[1], shape[0], getattr(formats, group), dtype_bytes, formats.int4_block)
        out[group] = out.get(group, 0) + b
    return out


def gpus_needed(total: int, per_gpu_gib: float) -> int | None:
    """Fewest of 1/2/4/8 GPUs whose even share of `total` + WORKSPACE_GIB fits `per_gpu_gib` (None: none)."""
    for n in (1, 2, 4, 8):
        if total / n / GiB + WORKSPACE_GIB <= per_gpu_gib:
            return n
    return None


def markdown(models, mixes) -> str:
    from qwen_vl_trt.model.weight_formats import WeightFormats

    out = ["| model | --weights | attention | mlp | experts | lm_head | other | decoder total | H100s (77.6 GiB) "
           "| H200s (139 GiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name in models:
        cfg = released_config(name)
        for mix in mixes:
            g = group_bytes(cfg, WeightFormats.parse(mix))
            total = sum(g.values())
            cells = " | ".join(f"{g[k] / 1e9:.2f} GB" if k in g else "-"
                               for k in ("attention", "mlp", "experts", "lm_head", "other"))
            fit = [gpus_needed(total, c) for c in (H100_GIB, H200_GIB)]
            out.append(f"| {name} | `{mix}` | {cells} | **{total / 1e9:.1f} GB** | "
                       + " | ".join(f"{n}" if n else "> 8" for n in fit) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(RELEASED))
    ap.add_argument("--weights", default=";".join(DEFAULT_MIXES), help="mixes separated by ';'")
    args = ap.parse_args(argv)
    print(markdown(args.models.split(","), args.weights.split(";")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
