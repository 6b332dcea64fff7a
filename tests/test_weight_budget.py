"""The decoder weight bytes the exporter reports (export/weight_report.py, logged by export_graphs) against the
formula of bench/weight_budget.py evaluated on the checkpoint's config: the reported side sums the byte lengths of
the initializers actually written to decoder.onnx.data; the formula side multiplies out the HF model's parameter
shapes (transformers on the meta device) by the bytes per element of each format. Exact equality (byte counts).

Checkpoints: the tiny Qwen3-VL-MoE of export/demo_checkpoint.py (moe_intermediate_size 48), once shaped like
Qwen3-VL-235B-A22B (untied, every layer MoE, 3 layers, the fewest its 3 DeepStack taps allow: a depth-cut release
with narrow widths) and once as the demo's mix of a dense-MLP layer (intermediate 37: not a multiple of the INT4
block, so it stays dense) and MoE layers, untied and tied (the decoder reads the embedding table as lm_head). fp32
graphs: dense and scale elements are 4 bytes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_MOE_TINY, make_checkpoint
from qwen_vl_trt.export.weight_report import weight_bytes
from qwen_vl_trt.model.weight_formats import WeightFormats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from weight_budget import group_bytes  # noqa: E402

FP32 = 4
RELEASED_235B_LAYERS = 94  # bench/make_random_checkpoint.py RELEASED["235B-A22B"]


def _ckpt(tmp_path_factory, name: str, **text):
    cfg = {**QWEN3_VL_MOE_TINY["text_config"], "moe_intermediate_size": 48, **text}
    return make_checkpoint(tmp_path_factory.mktemp(name), "qwen3_vl_moe", seed=4,
                           config_overrides={"text_config": cfg})


@pytest.fixture(scope="module")
def moe_235b_shaped(tmp_path_factory):
    return _ckpt(tmp_path_factory, "moe_235b_shaped", num_hidden_layers=3, mlp_only_layers=[])


@pytest.fixture(scope="module")
def moe_mixed(tmp_path_factory):
    return _ckpt(tmp_path_factory, "moe_mixed")  # layer 1 is a dense MLP


def _export(ckpt, out, formats, budget_layers=None):
    log: list[str] = []
    export_graphs(ckpt, out, "fp32", graphs=("decoder",), progress=log.append, formats=formats,
                  budget_layers=budget_layers)
    return weight_bytes(Path(out) / "decoder.onnx", formats), log


def _config(ckpt, **text) -> dict:
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    cfg["text_config"].update(text)
    return cfg


def test_235b_shaped_fp8_attention_int4_experts_bytes_equal_the_formula(moe_235b_shaped, tmp_path):
    formats = WeightFormats.parse("attention=fp8,experts=int4", int4_block=16)
    counts, log = _export(moe_235b_shaped, tmp_path, formats, budget_layers=RELEASED_235B_LAYERS)
    expected = group_bytes(_config(moe_235b_shaped), formats, FP32)
    assert counts["groups"] == expected
    assert set(expected) == {"attention", "experts", "lm_head", "other"}
    assert counts["total"] == sum(expected.values())
    # the layers are alike, so "at 94 layers" is the formula on the config at the released depth
    at_94 = sum(group_bytes(_config(moe_235b_shaped, num_hidden_layers=RELEASED_235B_LAYERS), formats, FP32).values())
    layers = list(counts["layers"].values())
    assert len(layers) == 3 and len(set(layers)) == 1
    assert counts["outside_layers"] + RELEASED_235B_LAYERS * layers[0] == at_94
    assert f"decoder weights at {RELEASED_235B_LAYERS} layers: {at_94 / 1e9:.2f} GB" in log
    assert any(line.startswith(f"decoder weights: {sum(expected.values()) / 1e9:.3f} GB") for line in log)


@pytest.mark.parametrize("mix", ["int4,lm_head=int8", "fp8,lm_head=int4", "dense"])
def test_dense_mlp_layer_mixes_bytes_equal_the_formula(mix, moe_mixed, tmp_path):
    formats = WeightFormats.parse(mix, int4_block=16)
    counts, _ = _export(moe_mixed, tmp_path, formats)
    expected = group_bytes(_config(moe_mixed), formats, FP32)
    assert "mlp" in expected and "experts" in expected
    assert counts["groups"] == expected


@pytest.mark.parametrize("mix", ["dense", "lm_head=int4", "lm_head=fp8"])
def test_tied_lm_head_counts_the_embedding_table_as_lm_head(mix, tmp_path_factory, tmp_path):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("moe_tied"), "qwen3_vl_moe", tie_word_embeddings=True, seed=5)
    formats = WeightFormats.parse(mix, int4_block=16)
    counts, _ = _export(ckpt, tmp_path, formats)
    expected = group_bytes(_config(ckpt), formats, FP32)
    assert counts["groups"] == expected
    assert expected["lm_head"] > 0.8 * counts["total"]  # the 151936 x 64 table dominates the decoder (89 % in int4)
