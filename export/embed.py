"""Graph 2, `embed.onnx`: token embedding + scatter of the vision features into the pad positions.

Equivalent to HF `inputs_embeds.masked_scatter(image_mask, image_embeds)` (and the video mask), done as a
gather so that it is one TensorRT-friendly kernel: the k-th image/video pad token of the flattened
[batch*seq] ids takes row k of `vision_features`; every other position keeps its token embedding.
DeepStack features are laid out the same way, with zeros at text positions, so the decoder can add them to
all positions (adding +0.0 is exact, so this equals HF `_deepstack_process`).

| I/O | name | dtype | shape | meaning |
|---|---|---|---|---|
| in | `input_ids` | int64 | [batch, seq] | token ids incl. image/video pad tokens |
| in | `vision_features` | DT | [num_merged, C] | rows in the order of the pad tokens in input_ids (row-major over batch); may be 0 rows |
| in | `deepstack_features` | DT | [Ld, num_merged, C] | DeepStack rows, same order as vision_features (Qwen3-VL only) |
| out | `inputs_embeds` | DT | [batch, seq, C] | token embeddings, pads replaced by vision rows |
| out | `deepstack_embeds` | DT | [Ld, batch, seq, C] | DeepStack features at the visual positions, zeros elsewhere (Qwen3-VL only) |

The runtime must pass exactly one vision row per pad token (it checks the count before the call).
"""
from __future__ import annotations

import json
from pathlib import Path

from onnx import helper

from qwen_vl_trt.model.contracts import embed_contract
from .layers import cast, reshape
from .onnx_graph import ELEM, GraphBuilder
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.weight_formats import METADATA_KEY, WeightFormats
from .weights import CheckpointWeights


def export_embed(spec: ModelSpec, weights: CheckpointWeights, out_dir: Path, dtype: str,
                 formats: WeightFormats = WeightFormats()) -> Path:
    """The table stays dense in every format (`formats.embedding` is always dense; docs/graphs.md says why);
    `formats` is recorded in the graph's metadata as decoder.onnx records it."""
    contract = embed_contract(spec).resolve(dtype)
    g, x, path = GraphBuilder.for_contract(contract, out_dir, dtype)
    key = f"{spec.weight_prefixes['text']}embed_tokens.weight"
    c = spec.text.hidden_size

    with g.scope("embed"):
        ids = x["input_ids"]
        text = g.op("Gather", [g.weight(key, weights.get(key)), ids], axis=0)  # [B, S, C]
        is_pad = g.op("Or", [g.op("Equal", [ids, g.const(spec.image_token_id, "int64")]),
                             g.op("Equal", [ids, g.const(spec.video_token_id, "int64")])])  # [B, S]
        rows = pad_rows(g, is_pad, x["vision_features"])  # [B, S] row of vision_features, or M
        zero = zeros_like_row(g, x["vision_features"], c)  # [1, C]
        table = g.op("Concat", [x["vision_features"], zero], axis=0)  # [M+1, C]
        visual = g.op("Gather", [table, rows], axis=0)  # [B, S, C]
        embeds = g.op("Where", [g.op("Unsqueeze", [is_pad, g.const([-1])]), visual, text])
        g.output(embeds, "inputs_embeds", dtype, contract.output("inputs_embeds").dims)
        if spec.num_deepstack:
            ds = x["deepstack_features"]  # [Ld, M, C]
            ds_zero = g.op("Expand", [g.op("Unsqueeze", [zero, g.const([0])]),
                                      g.const([spec.num_deepstack, 1, c], "int64")])  # [Ld, 1, C]
            ds_table = g.op("Concat", [ds, ds_zero], axis=1)  # [Ld, M+1, C]
            g.output(g.op("Gather", [ds_table, rows], axis=1), "deepstack_embeds", dtype,
                     contract.output("deepstack_embeds").dims)  # [Ld, B, S, C]
    g.finish(path, doc=__doc__, output_order=[t.name for t in contract.outputs],
             metadata={METADATA_KEY: json.dumps(formats.to_json())})
    return path


def pad_rows(g: GraphBuilder, is_pad: str, features: str) -> str:
    """k-th pad token (row-major) -> k; non-pad -> M (the appended zero row)."""
    flat = reshape(g, cast(g, is_pad, "int64"), [-1])  # [B*S]
    k = g.op("Sub", [g.op("CumSum", [flat, g.const(0, "int64")]), g.const(1, "int64")])
    m = g.op("Gather", [g.op("Shape", [features]), g.const(0, "int64")])
    rows = g.op("Where", [reshape(g, is_pad, [-1]), k, m])
    return g.op("Reshape", [rows, g.op("Shape", [is_pad])])  # [B, S]


def zeros_like_row(g: GraphBuilder, features: str, c: int) -> str:
    return g.op("ConstantOfShape", [g.const([1, c], "int64")],
                value=helper.make_tensor("zero", ELEM[g.dtype], [1], [0]))
