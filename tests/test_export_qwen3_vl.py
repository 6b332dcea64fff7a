"""Qwen3-VL graphs (ONNX Runtime CPU, fp32) against HF transformers on the same inputs.

vision.onnx vs `model.model.visual` (merged + every DeepStack level), embed.onnx vs HF's placeholder
scatter, decoder.onnx vs the full HF forward (prefill with an image, 16 decode steps through the explicit
cache vs HF with its own cache, a right-padded batch of two different lengths), tied and untied.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_reference import (DECODERS, VISIONS, assert_prefill_and_decode_match_hf, carry_cache, empty_cache, fp32_graphs, hf_model,
                          prompt_with_pads, run, session, vision_feeds)
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.model.spec import ModelSpec
from tolerances import FP32_ATOL

# grids (t, h, w) in patches: 224x160 -> (1, 14, 10); 96x320 -> (1, 6, 20); 4 frames of 64x64 -> (2, 4, 4)
ONE_IMAGE = [[1, 14, 10]]
TWO_IMAGES = [[1, 14, 10], [1, 6, 20]]
VIDEO = [[2, 4, 4]]
FAMILIES = ["qwen3_vl", "qwen3_vl_moe"]  # one vision tower and embedding; the MoE text MLP: tests/test_moe.py


def _family(request, family: str):
    """(checkpoint, fp32 graphs, HF model): the session fixtures of `family` (conftest.py)."""
    return tuple(request.getfixturevalue(name.format(family)) for name in ("{}_ckpt", "{}_fp32_graphs", "hf_{}"))


@pytest.mark.parametrize("graph", VISIONS, ids=["plugin_graph", "ort_fused"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grids", [ONE_IMAGE, TWO_IMAGES, VIDEO], ids=["one_image", "two_images", "video"])
def test_vision_matches_hf(grids, family, graph, request):
    _, graphs, hf = _family(request, family)
    grid = torch.tensor(grids)
    torch.manual_seed(0)
    pixels = torch.randn(int(grid.prod(1).sum()), 3 * 2 * 16 * 16)
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=grid)
    out = run(session(graphs / graph), vision_feeds(grid, pixels, hf.config.vision_config))
    np.testing.assert_allclose(out["vision_features"], ref.pooler_output.numpy(), rtol=0, atol=FP32_ATOL)
    assert out["deepstack_features"].shape[0] == len(ref.deepstack_features) == 3
    for level, feat in enumerate(ref.deepstack_features):
        np.testing.assert_allclose(out["deepstack_features"][level], feat.numpy(), rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_embed_matches_hf_scatter(family, request):
    ckpt, graphs, hf = _family(request, family)
    spec = ModelSpec.from_checkpoint(ckpt)
    ids = prompt_with_pads(spec, [35, 30])
    feats = torch.randn(65, spec.text.hidden_size)
    deep = torch.randn(3, 65, spec.text.hidden_size)
    model = hf.model
    with torch.no_grad():
        text = model.get_input_embeddings()(ids)
        mask, _ = model.get_placeholder_mask(ids, inputs_embeds=text, image_features=feats)
        ref = text.masked_scatter(mask, feats)
    out = run(session(graphs / "embed.onnx"),
              {"input_ids": ids.numpy(), "vision_features": feats.numpy(), "deepstack_features": deep.numpy()})
    np.testing.assert_array_equal(out["inputs_embeds"], ref.numpy())  # a gather/copy: exact
    visual = mask[..., 0].numpy()
    for level in range(3):  # HF adds deepstack rows at visual positions only
        np.testing.assert_array_equal(out["deepstack_embeds"][level][visual], deep[level].numpy())
        assert not out["deepstack_embeds"][level][~visual].any()


def test_embed_text_only_has_no_rows(qwen3_vl_fp32_graphs, hf_qwen3_vl):
    ids = torch.tensor([[1, 2, 3, 4]])
    out = run(session(qwen3_vl_fp32_graphs / "embed.onnx"), {
        "input_ids": ids.numpy(), "vision_features": np.zeros((0, 64), np.float32),
        "deepstack_features": np.zeros((3, 0, 64), np.float32)})
    np.testing.assert_array_equal(out["inputs_embeds"], hf_qwen3_vl.model.get_input_embeddings()(ids).detach().numpy())


@pytest.mark.parametrize("tied,decoder", [(False, "decoder.onnx"), (True, "decoder.onnx"), (False, "decoder.ort.onnx")],
                         ids=["untied", "tied", "untied_ort_fused"])
def test_decoder_prefill_and_16_decode_steps_match_hf(tied, decoder, request, tmp_path_factory):
    ckpt = request.getfixturevalue("qwen3_vl_tied_ckpt" if tied else "qwen3_vl_ckpt")
    if tied:
        hf, graphs = hf_model(ckpt), fp32_graphs(ckpt, tmp_path_factory.mktemp("tied_graphs"))
    else:
        hf, graphs = request.getfixturevalue("hf_qwen3_vl"), request.getfixturevalue("qwen3_vl_fp32_graphs")
    spec = ModelSpec.from_checkpoint(ckpt)
    assert spec.text.tie_word_embeddings == tied
    ids = prompt_with_pads(spec, [35])
    torch.manual_seed(1)
    pixels = torch.randn(140, 1536)
    assert_prefill_and_decode_match_hf(hf, graphs, spec, ids, torch.tensor(ONE_IMAGE), pixels, steps=16,
                                       atol=FP32_ATOL, decoder=decoder)


@pytest.mark.parametrize("decoder", DECODERS, ids=["plugin_graph", "ort_fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_batch_of_different_lengths(family, decoder, request):
    """Two right-padded text prompts in one call == each run alone in HF; then one decode step each (MoE: the
    prefill step has 44 token-expert assignments in tiles of several rows, the decode step one row per tile)."""
    ckpt, graphs, hf = _family(request, family)
    spec = ModelSpec.from_checkpoint(ckpt)
    prompts = [torch.arange(100, 111), torch.arange(300, 306)]
    s_max, c = 11, spec.text.hidden_size
    emb = session(graphs / "embed.onnx")
    padded = torch.zeros(2, s_max, dtype=torch.long)
    pos = np.zeros((3, 2, s_max), np.int64)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
        pos[:, b, :len(p)] = np.arange(len(p))
    e = run(emb, {"input_ids": padded.numpy(), "vision_features": np.zeros((0, c), np.float32),
                  "deepstack_features": np.zeros((3, 0, c), np.float32)})
    feeds = {"inputs_embeds": e["inputs_embeds"], "deepstack_embeds": e["deepstack_embeds"], "position_ids": pos,
             "past_lengths": np.zeros(2, np.int64), "logits_index": np.array([len(p) - 1 for p in prompts]),
             **empty_cache(spec, 2, 32)}
    dec = session(graphs / decoder)
    out = run(dec, feeds)
    nxt = np.array([[7], [9]])
    e = run(emb, {"input_ids": nxt, "vision_features": np.zeros((0, c), np.float32),
                  "deepstack_features": np.zeros((3, 0, c), np.float32)})
    lens = np.array([len(p) for p in prompts])
    step = run(dec, {"inputs_embeds": e["inputs_embeds"], "deepstack_embeds": e["deepstack_embeds"],
                     "position_ids": np.broadcast_to(lens[None, :, None], (3, 2, 1)).copy(), "past_lengths": lens,
                     "logits_index": np.zeros(2, np.int64), **carry_cache(out, spec.text.num_hidden_layers)})
    for b, p in enumerate(prompts):
        with torch.no_grad():
            # explicit positions: HF caches rope_deltas on the model between calls
            ref = hf(input_ids=p[None], use_cache=True, position_ids=torch.arange(len(p)).expand(3, 1, -1))
            ref2 = hf(input_ids=torch.tensor([[int(nxt[b, 0])]]), past_key_values=ref.past_key_values,
                      use_cache=True, position_ids=torch.full((3, 1, 1), len(p)))
        np.testing.assert_allclose(out["logits"][b], ref.logits[0, -1].numpy(), rtol=0, atol=FP32_ATOL)
        np.testing.assert_allclose(step["logits"][b], ref2.logits[0, -1].numpy(), rtol=0, atol=FP32_ATOL)


def test_sharded_checkpoint_exports_the_same_graphs(qwen3_vl_ckpt, qwen3_vl_fp32_graphs, tmp_path):
    """A checkpoint saved in shards with model.safetensors.index.json gives the same weights bytes."""
    import transformers

    from qwen_vl_trt.export.demo_checkpoint import make_checkpoint

    sharded = make_checkpoint(tmp_path / "sharded", "qwen3_vl", seed=0, max_shard_size="20MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    export_graphs(sharded, tmp_path / "g", "fp32", graphs=("decoder",))
    a = (tmp_path / "g" / "decoder.onnx.data").read_bytes()
    b = (qwen3_vl_fp32_graphs / "decoder.onnx.data").read_bytes()
    assert a == b
