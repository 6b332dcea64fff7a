"""The decoder's weight bytes per group of model/weight_formats.py and per layer, read from what the exporter wrote:
the byte length of each external-data initializer of decoder.onnx (decoder.onnx.data), logged at the end of the
decoder export (export/cli.py export_graphs). docs/large-models.md "Weight bytes per format" holds the same count
computed from the released shapes (bench/weight_budget.py).

Grouping: an initializer named after an HF key (`model.language_model.layers.3.self_attn.q_proj.weight_t.fp8`,
`....mlp.experts.gate_up_proj.int4`) belongs to WeightFormats.group_of of its module key; the stacked MoE experts
to `experts`; the tied embedding table that lm_head reads to `lm_head`; norms, the router and the rest to `other`.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import onnx

from ..model.weight_formats import WeightFormats

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def group_of_initializer(name: str, formats: WeightFormats) -> str:
    if ".mlp.experts." in name:
        return "experts"
    if name.endswith("embed_tokens.weight") or ".embed_tokens.weight_t" in name:
        return "lm_head"  # the decoder holds the embedding table only as the tied lm_head
    module = name.split(".weight")[0]
    return formats.group_of(module) or "other"


def weight_bytes(onnx_path: str | Path, formats: WeightFormats) -> dict:
    """{"groups": {group: bytes}, "layers": {layer index: bytes}, "outside_layers": bytes, "total": bytes} of the
    external-data initializers of `onnx_path` (their stored `length`; the weights themselves are not read)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    groups: dict[str, int] = defaultdict(int)
    layers: dict[int, int] = defaultdict(int)
    outside = 0
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        n = int({e.key: e.value for e in t.external_data}["length"])
        groups[group_of_initializer(t.name, formats)] += n
        m = _LAYER.search(t.name)
        if m:
            layers[int(m.group(1))] += n
        else:
            outside += n
    return {"groups": dict(groups), "layers": dict(sorted(layers.items())), "outside_layers": outside,
            "total": sum(groups.values())}


def report_lines(counts: dict, at_layers: int | None = None) -> list[str]:
    """Log lines: bytes per group, per layer (min / mean / max), and "at N layers: X GB" = bytes outside the
    layers + N x the mean layer (N = `at_layers`, default the exported depth; assumes the layers alike, as in a
    depth-cut released config)."""
    groups = ", ".join(f"{g} {b / 1e9:.3f} GB" for g, b in sorted(counts["groups"].items()))
    per = list(counts["layers"].values())
    lines = [f"decoder weights: {counts['total'] / 1e9:.3f} GB ({groups})"]
    if per:
        mean = sum(per) / len(per)
        n = at_layers or len(per)
        lines.append(f"decoder weights per layer: {min(per) / 1e9:.3f} / {mean / 1e9:.3f} / {max(per) / 1e9:.3f} GB "
                     f"(min / mean / max over {len(per)} layers), outside the layers "
                     f"{counts['outside_layers'] / 1e9:.3f} GB")
        lines.append(f"decoder weights at {n} layers: {(counts['outside_layers'] + n * mean) / 1e9:.2f} GB")
    return lines
