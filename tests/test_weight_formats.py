"""`--weights` parsing (model/weight_formats.py): the grammar, the shorthands and the groups of HF keys."""
import pytest

from qwen_vl_trt.model.errors import UserError
from qwen_vl_trt.model.weight_formats import WeightFormats


def test_shorthands_cover_what_the_issue_names():
    assert WeightFormats.parse("dense").is_dense
    fp8 = WeightFormats.parse("fp8")
    assert (fp8.attention, fp8.mlp, fp8.experts, fp8.lm_head, fp8.embedding) == ("fp8", "fp8", "fp8", "dense", "dense")
    int4 = WeightFormats.parse("int4", int4_block=64)
    assert (int4.attention, int4.mlp, int4.experts, int4.lm_head, int4.embedding) == ("int4",) * 4 + ("dense",)
    assert int4.describe() == ("attention=int4-sym-b64,mlp=int4-sym-b64,experts=int4-sym-b64,lm_head=int4-sym-b64")


def test_mixes_and_overrides():
    mix = WeightFormats.parse("attention=fp8,experts=int4")
    assert (mix.attention, mix.mlp, mix.experts, mix.lm_head) == ("fp8", "dense", "int4", "dense")
    assert WeightFormats.parse("int4,lm_head=int8").lm_head == "int8"
    assert WeightFormats.parse("int4", int4_activations="int8").describe().endswith("int4_activations=int8")


@pytest.mark.parametrize("text", ["fp4", "attention=int8", "vision=int4", "mlp", "lm_head=int4,int4",
                                  "embedding=fp8"])
def test_refused_with_one_message(text):
    with pytest.raises(UserError, match="--weights"):
        WeightFormats.parse(text)


def test_groups_of_hf_keys():
    f = WeightFormats.parse("attention=fp8,mlp=int4,lm_head=int8")
    pre = "model.language_model.layers.3."
    assert f.format_of(pre + "self_attn.q_proj") == "fp8"
    assert f.format_of(pre + "mlp.down_proj") == "int4"
    assert f.format_of(pre + "mlp.gate") == "dense"  # MoE router
    assert f.format_of("lm_head") == "int8"
    assert f.format_of("model.visual.blocks.0.mlp.linear_fc1") == "dense"
    assert f.format_of("model.visual.blocks.0.attn.qkv") == "dense"


def test_manifest_round_trip_and_old_string():
    f = WeightFormats.parse("attention=fp8,experts=int4", int4_block=32, int4_activations="int8")
    assert WeightFormats.from_json(f.to_json()) == f
    old = WeightFormats.from_json("int4-rtn-sym-b128")
    assert (old.attention, old.mlp, old.lm_head, old.int4_block) == ("int4", "int4", "dense", 128)
    assert WeightFormats.from_json("dense").is_dense


def test_int4_block_default_is_one_for_both_activations():
    """Without --int4-block-size: block 128 for fp32 and for int8 activations (DEFAULT_INT4_BLOCK: one export serves
    both, docs/benchmarks.md); a given block is kept either way."""
    assert WeightFormats.parse("int4").int4_block == 128
    assert WeightFormats.parse("int4", int4_activations="int8").int4_block == 128
    assert WeightFormats.parse("int4", int4_block=32).int4_block == 32
    assert WeightFormats.parse("int4", int4_block=64, int4_activations="int8").int4_block == 64
    with pytest.raises(UserError, match="--int4-activations 'int2'"):
        WeightFormats.parse("int4", int4_activations="int2")


def test_export_flags_default_block():
    import argparse

    from qwen_vl_trt.export.cli import add_weight_arguments, weight_formats

    ap = argparse.ArgumentParser()
    add_weight_arguments(ap)
    assert weight_formats(ap.parse_args(["--weights", "int4"])).int4_block == 128
    assert weight_formats(ap.parse_args(["--weights", "int4", "--int4-activations", "int8"])).int4_block == 128
    assert weight_formats(ap.parse_args(["--weights", "int4", "--int4-block-size", "32"])).int4_block == 32
