"""ModelSpec parsing: released config spellings of transformers 4.57 and 5.x, and clear errors."""
from __future__ import annotations

import json

import pytest

from qwen_vl_trt.model.errors import CheckpointError
from qwen_vl_trt.model.spec import ModelSpec


def _config(qwen3_vl_ckpt) -> dict:
    return json.loads((qwen3_vl_ckpt / "config.json").read_text())


def test_5x_config_matches_hf(qwen3_vl_ckpt):
    import transformers

    hf = transformers.AutoConfig.from_pretrained(qwen3_vl_ckpt)
    spec = ModelSpec.from_checkpoint(qwen3_vl_ckpt)
    t = hf.text_config
    assert (spec.text.hidden_size, spec.text.num_hidden_layers, spec.text.num_key_value_heads, spec.text.head_dim) == \
        (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.head_dim)
    assert spec.text.mrope_section == tuple(t.rope_parameters["mrope_section"])
    assert spec.text.rope_theta == t.rope_parameters["rope_theta"]
    assert spec.vision.deepstack_visual_indexes == tuple(hf.vision_config.deepstack_visual_indexes)
    assert spec.text.tie_word_embeddings == hf.tie_word_embeddings


def test_457_spelling_rope_scaling_and_nested_tie(qwen3_vl_ckpt):
    """4.57 configs: rope_scaling + rope_theta in text_config, tie_word_embeddings inside text_config."""
    cfg = _config(qwen3_vl_ckpt)
    text = cfg["text_config"]
    params = text.pop("rope_parameters")
    text["rope_theta"] = params["rope_theta"]
    text["rope_scaling"] = {"rope_type": "default", "mrope_section": params["mrope_section"], "mrope_interleaved": True}
    cfg.pop("tie_word_embeddings")
    text["tie_word_embeddings"] = True
    spec = ModelSpec.from_config(cfg)
    assert spec.text.rope_theta == params["rope_theta"]
    assert spec.text.mrope_section == tuple(params["mrope_section"])
    assert spec.text.tie_word_embeddings is True
    assert spec.text.mrope_interleaved is True


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(model_type="llava"), "model_type 'llava' is not supported (supported: qwen2_5_vl, qwen3_vl, qwen3_vl_moe)"),
    (lambda c: c["text_config"].pop("hidden_size"), "text_config.hidden_size missing"),
    (lambda c: c["vision_config"].update(depth="deep"), "vision_config.depth has an invalid value 'deep'"),
    (lambda c: c.pop("vision_config"), "vision_config missing or not an object"),
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[8, 8, 8]),
     "mrope_section [8, 8, 8] does not cover head_dim 32"),
    (lambda c: c["vision_config"].update(out_hidden_size=128), "vision_config.out_hidden_size 128 != text hidden_size 64"),
])
def test_bad_config_raises_clear_error(qwen3_vl_ckpt, mutate, message):
    cfg = _config(qwen3_vl_ckpt)
    mutate(cfg)
    with pytest.raises(CheckpointError) as err:
        ModelSpec.from_config(cfg, source="config.json")
    assert message in str(err.value)


def test_missing_and_invalid_config_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        ModelSpec.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ModelSpec.from_checkpoint(tmp_path)
