"""Qwen2.5-VL through the whole pipeline, against HF transformers (`Qwen2_5_VLForConditionalGeneration`).

Graphs on ONNX Runtime CPU in fp32: vision.onnx vs `model.model.visual` (window attention with 112-px windows,
full attention in blocks 1 and 3, an image larger than one window, two images, a 4-frame video), embed.onnx
vs HF's placeholder scatter (exact), decoder.onnx prefill + 16 decode steps vs HF's forward (tied, untied).
Checkpoint spellings: the flat 4.x config and the nested 5.x one, both key layouts. End to end:
`export_all` (what export_all.sh runs, without engines) then `trt-run` greedy tokens == HF `generate`
for one image, two images, a video and text only, with the released generation config (repetition penalty
1.05, which HF applies even when greedy).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_processor as H
from hf_reference import (VISIONS, assert_prefill_and_decode_match_hf, fp32_graphs, hf_model, prompt_with_pads, run, session,
                          text_embed_feeds, vision_feeds)
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.model.errors import CheckpointError
from qwen_vl_trt.model.spec import ModelSpec
from test_generate import N_NEW, hf_generate, run_json, write_media
from tolerances import FP32_ATOL

# grids (t, h, w) in patches of 14 px. 224x308 -> (1, 16, 22): 8x11 merged tokens = 2x3 windows of 4x4, the
# last window row/column partial; 112x84 -> (1, 8, 6); 4 frames of 112x140 -> (2, 8, 10): 2 windows per frame.
ONE_IMAGE = [[1, 16, 22]]
TWO_IMAGES = [[1, 16, 22], [1, 8, 6]]
VIDEO = [[2, 8, 10]]
PATCH_DIM = 3 * 2 * 14 * 14


def _pixels(grids, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(int(torch.tensor(grids).prod(1).sum()), PATCH_DIM)


@pytest.mark.parametrize("graph", VISIONS, ids=["plugin_graph", "ort_fused"])
@pytest.mark.parametrize("grids", [ONE_IMAGE, TWO_IMAGES, VIDEO], ids=["one_image", "two_images", "video"])
def test_vision_matches_hf(grids, graph, qwen2_5_vl_fp32_graphs, hf_qwen2_5_vl):
    grid, pixels = torch.tensor(grids), _pixels(grids)
    with torch.no_grad():
        ref = hf_qwen2_5_vl.model.visual(pixels, grid_thw=grid).pooler_output.numpy()  # original token order
    feeds = vision_feeds(grid, pixels, hf_qwen2_5_vl.config.vision_config)  # HF's own host-side functions
    out = run(session(qwen2_5_vl_fp32_graphs / graph), feeds)
    assert set(out) == {"vision_features"}  # no DeepStack
    np.testing.assert_allclose(out["vision_features"], ref, rtol=0, atol=FP32_ATOL)


def test_vision_test_sees_the_windows(qwen2_5_vl_fp32_graphs, hf_qwen2_5_vl):
    """The inputs above make window attention and the window permutation matter: feeding full-attention
    segments as windows, or the identity as window_index, moves the output past the tolerance."""
    grid, pixels = torch.tensor(ONE_IMAGE), _pixels(ONE_IMAGE)
    with torch.no_grad():
        ref = hf_qwen2_5_vl.model.visual(pixels, grid_thw=grid).pooler_output.numpy()
    feeds = vision_feeds(grid, pixels, hf_qwen2_5_vl.config.vision_config)
    assert len(feeds["cu_window_seqlens"]) - 1 == 6 and len(feeds["cu_seqlens"]) - 1 == 1
    sess = session(qwen2_5_vl_fp32_graphs / "vision.onnx")
    for wrong in ({"cu_window_seqlens": feeds["cu_seqlens"]}, {"window_index": np.arange(len(feeds["window_index"]))}):
        out = run(sess, {**feeds, **wrong})["vision_features"]
        assert np.abs(out - ref).max() > 2 * FP32_ATOL, list(wrong)


def test_embed_matches_hf_scatter(qwen2_5_vl_ckpt, qwen2_5_vl_fp32_graphs, hf_qwen2_5_vl):
    """An image then a video in one prompt: pads of both kinds take rows in prompt order (HF scatters the image
    rows into image pads and the video rows into video pads, which is the same order here)."""
    spec = ModelSpec.from_checkpoint(qwen2_5_vl_ckpt)
    ids = prompt_with_pads(spec, [88, 40], pad_ids=[spec.image_token_id, spec.video_token_id])
    image, video = torch.randn(88, 64), torch.randn(40, 64)
    model = hf_qwen2_5_vl.model
    with torch.no_grad():
        text = model.get_input_embeddings()(ids)
        image_mask, video_mask = model.get_placeholder_mask(ids, inputs_embeds=text, image_features=image,
                                                            video_features=video)
        ref = text.masked_scatter(image_mask, image).masked_scatter(video_mask, video)
    sess = session(qwen2_5_vl_fp32_graphs / "embed.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "vision_features"]
    out = run(sess, {"input_ids": ids.numpy(), "vision_features": torch.cat([image, video]).numpy()})
    assert set(out) == {"inputs_embeds"}
    np.testing.assert_array_equal(out["inputs_embeds"], ref.numpy())  # a gather/copy: exact
    text_only = run(sess, text_embed_feeds(spec, ids[:, :5].numpy()))["inputs_embeds"]
    np.testing.assert_array_equal(text_only, text[:, :5].numpy())


@pytest.mark.parametrize("tied,decoder", [(False, "decoder.onnx"), (True, "decoder.onnx"), (False, "decoder.ort.onnx")],
                         ids=["untied", "tied", "untied_ort_fused"])
def test_decoder_prefill_and_16_decode_steps_match_hf(tied, decoder, request, tmp_path_factory):
    if tied:
        ckpt = request.getfixturevalue("qwen2_5_vl_tied_ckpt")
        hf, graphs = hf_model(ckpt), fp32_graphs(ckpt, tmp_path_factory.mktemp("qwen2_5_vl_tied_graphs"))
    else:
        ckpt = request.getfixturevalue("qwen2_5_vl_ckpt")
        hf, graphs = request.getfixturevalue("hf_qwen2_5_vl"), request.getfixturevalue("qwen2_5_vl_fp32_graphs")
    spec = ModelSpec.from_checkpoint(ckpt)
    assert spec.text.tie_word_embeddings == tied == hf.config.tie_word_embeddings
    ids = prompt_with_pads(spec, [88])  # one image of grid (1, 16, 22)
    worst = assert_prefill_and_decode_match_hf(hf, graphs, spec, ids, torch.tensor(ONE_IMAGE), _pixels(ONE_IMAGE, 1),
                                               steps=16, atol=FP32_ATOL, decoder=decoder)
    assert worst <= FP32_ATOL


def test_decoder_has_no_deepstack_input(qwen2_5_vl_fp32_graphs):
    names = [i.name for i in session(qwen2_5_vl_fp32_graphs / "decoder.onnx").get_inputs()]
    assert names[:4] == ["inputs_embeds", "position_ids", "past_lengths", "logits_index"]
    assert not any("deepstack" in n for n in names)


def test_both_key_layouts_export_the_same_graphs(qwen2_5_vl_ckpt, qwen2_5_vl_fp32_graphs, tmp_path):
    """transformers 5.x save_pretrained writes the released layout (`visual.*`, `model.layers.*`); the same
    weights under the in-memory names (`model.visual.*`, `model.language_model.*`) give identical graphs."""
    stored = load_file(qwen2_5_vl_ckpt / "model.safetensors")
    assert any(k.startswith("visual.") for k in stored) and any(k.startswith("model.layers.") for k in stored)
    renamed = {("model." + k if k.startswith("visual.") else
                k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in stored.items()}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(renamed, ckpt / "model.safetensors", metadata={"format": "pt"})
    (ckpt / "config.json").write_bytes((qwen2_5_vl_ckpt / "config.json").read_bytes())
    export_graphs(ckpt, tmp_path / "g", "fp32")
    for name in ("vision", "embed", "decoder"):
        for suffix in (".onnx", ".onnx.data"):
            assert (tmp_path / "g" / f"{name}{suffix}").read_bytes() == \
                (qwen2_5_vl_fp32_graphs / f"{name}{suffix}").read_bytes(), name + suffix


# ---- config spellings -----------------------------------------------------------------------------------
def _flat_4x_config(nested: dict) -> dict:
    """The released (transformers 4.x) spelling of a 5.x-saved config: text keys at the top level,
    rope_theta + rope_scaling {type: mrope}, vision without rope_parameters, in_chans only."""
    cfg = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    params = text.pop("rope_parameters")
    cfg.update(text, rope_theta=params["rope_theta"],
               rope_scaling={"type": "mrope", "mrope_section": params["mrope_section"]})
    cfg["model_type"] = "qwen2_5_vl"
    vision = {k: v for k, v in nested["vision_config"].items() if k not in ("rope_parameters", "in_channels")}
    cfg["vision_config"] = vision
    return cfg


def test_spec_reads_nested_5x_and_flat_4x_configs_as_hf(qwen2_5_vl_ckpt):
    import transformers

    nested = json.loads((qwen2_5_vl_ckpt / "config.json").read_text())
    assert "text_config" in nested  # what 5.x save_pretrained writes
    spec = ModelSpec.from_config(nested)
    assert ModelSpec.from_config(_flat_4x_config(nested)) == spec
    hf = transformers.AutoConfig.from_pretrained(qwen2_5_vl_ckpt)
    t, v = hf.text_config, hf.vision_config
    assert (spec.text.hidden_size, spec.text.num_hidden_layers, spec.text.num_key_value_heads, spec.text.head_dim,
            spec.text.rms_norm_eps, spec.text.rope_theta, spec.text.mrope_section) == \
        (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.hidden_size // t.num_attention_heads,
         t.rms_norm_eps, t.rope_parameters["rope_theta"], tuple(t.rope_parameters["mrope_section"]))
    assert (spec.vision.hidden_size, spec.vision.window_size, spec.vision.fullatt_block_indexes,
            spec.vision.tokens_per_second, spec.vision.rope_theta, spec.vision.in_channels) == \
        (v.hidden_size, v.window_size, tuple(v.fullatt_block_indexes), v.tokens_per_second,
         v.rope_parameters["rope_theta"], v.in_channels)
    assert not spec.text.mrope_interleaved and spec.text.attention_bias and not spec.text.qk_norm
    assert spec.num_deepstack == 0


def test_pre_v5_nested_tie_wins_as_in_hf(qwen2_5_vl_ckpt):
    import transformers

    cfg = json.loads((qwen2_5_vl_ckpt / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    cfg["text_config"]["tie_word_embeddings"] = True
    assert transformers.Qwen2_5_VLConfig(**cfg).tie_word_embeddings is True
    assert ModelSpec.from_config(cfg).text.tie_word_embeddings is True


@pytest.mark.parametrize("mutate, message", [
    # keys whose transformers class defaults match no release (model/spec.py)
    (lambda c: c["vision_config"].pop("hidden_size"), "vision_config.hidden_size missing"),
    (lambda c: c["vision_config"].pop("tokens_per_second"), "vision_config.tokens_per_second missing"),
    (lambda c: c.pop("rms_norm_eps"), "rms_norm_eps missing"),
    (lambda c: c["vision_config"].update(fullatt_block_indexes=[1, 9]),
     "vision_config window_size 112 / fullatt_block_indexes [1, 9] do not fit patch 14 x merge 2 / depth 4"),
    (lambda c: c.update(head_dim=32, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
     "head_dim 32 != hidden_size / num_attention_heads"),
])
def test_bad_qwen2_5_config_is_a_clear_error(qwen2_5_vl_ckpt, mutate, message):
    cfg = _flat_4x_config(json.loads((qwen2_5_vl_ckpt / "config.json").read_text()))
    mutate(cfg)
    with pytest.raises(CheckpointError) as err:
        ModelSpec.from_config(cfg)
    assert message in str(err.value)


# ---- end to end -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(qwen2_5_vl_ckpt, tmp_path_factory):
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits

    out = tmp_path_factory.mktemp("qwen2_5_vl_artifacts")
    export_all(qwen2_5_vl_ckpt, out, "fp32", Limits(max_batch=2, max_seq=1024, max_cache_len=1024))
    assert not (out / "video_preprocessor_config.json").exists()  # as the releases: video uses the image limits
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """224x308 (kept size, 2x3 windows), 90x300 (resized by smart_resize to 84x308), 30 frames of 112x140."""
    return write_media(tmp_path_factory.mktemp("qwen2_5_media"), [(224, 308), (90, 300)], (30, 112, 140, 3), seed=11)


@pytest.fixture(scope="module")
def processor(qwen2_5_vl_ckpt):
    # trt-run samples video frames at 2 fps (runtime/video.py, the qwen-vl-utils rule); HF's Qwen2-VL video
    # processor keeps every frame unless told to sample, so it is told to sample the same way.
    return H.qwen2_5_processor(qwen2_5_vl_ckpt, do_sample_frames=True, fps=2.0)


CASES = {
    "one_image": (["--image", "{img0}"], "Describe this image.", [0], False),
    "two_images": (["--image", "{img0}", "--image", "{img1}"], "Compare them.", [0, 1], False),
    "video": (["--video", "{frames}"], "What happens?", [], True),
    "text_only": ([], "Write a haiku about GPUs.", [], False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trt_run_greedy_tokens_match_hf_generate(case, artifacts, media, hf_qwen2_5_vl, processor):
    flags, prompt, images, video = CASES[case]
    paths = {"img0": media["images"][0], "img1": media["images"][1], "frames": media["frames_dir"]}
    ours = run_json(artifacts, *[f.format(**paths) for f in flags], "--prompt", prompt)
    ref = hf_generate(hf_qwen2_5_vl, processor, prompt, [media["images"][i] for i in images],
                      frames=media["frames"] if video else None)
    assert len(ours["token_ids"]) == N_NEW
    assert ours["token_ids"] == ref


def test_trt_run_cli_reads_the_model_type_from_config(artifacts, media, hf_qwen2_5_vl, processor):
    """The console entry point, nothing to choose: the same flags as for Qwen3-VL."""
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.serve.cli", "--model-dir", str(artifacts),
                        "--image", str(media["images"][1]), "--json", "--temperature", "0", "--ignore-eos",
                        "--max-new-tokens", str(N_NEW)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    assert ours["token_ids"] == hf_generate(hf_qwen2_5_vl, processor, "Describe this image.", [media["images"][1]])


def test_parity_tool_passes_layer_by_layer(qwen2_5_vl_ckpt, artifacts, media):
    """`qwen-vl-parity` on Qwen2.5-VL: every vision block (window order on both sides), the merged features,
    every decoder layer, the logits and 32 greedy tokens (with the checkpoint's repetition penalty, as HF)."""
    from test_parity_tool import run_tool

    code, out = run_tool(qwen2_5_vl_ckpt, artifacts, media["images"][0], tokens=32)
    assert code == 0, out["text"]
    assert list(out["rows"]) == [f"visual/blocks.{i}" for i in range(4)] + ["visual/merged"] + \
        [f"text/layers.{i}" for i in range(4)] + ["logits[last]"]
    assert set(out["rows"].values()) == {"yes"} and "greedy tokens (32): first divergence: none  yes" in out["text"]


@pytest.mark.parametrize("item", ["image", "video"])
def test_engine_with_caches_reuses_a_chat_turn_as_hf(item, artifacts, media, hf_qwen2_5_vl, processor):
    """Qwen2.5-VL through the in-flight engine with its prefix and encoder caches (runtime/prefix_cache.py,
    runtime/encoder_cache.py): no DeepStack; a video's temporal positions scale with second_per_grid_ts. A
    two-turn chat about an image or a video: turn 2 reuses at least all of turn 1's prompt rows and the item does
    not go through the vision encoder again; each turn's greedy tokens == HF `generate` for it alone. decoder.onnx
    with numpy I/O (chunks of 16 tokens after the reused prefix)."""
    from PIL import Image
    from transformers.video_utils import VideoMetadata

    from hf_reference import hf_greedy_new_tokens
    from test_generate import VIDEO_FPS
    from qwen_vl_trt.runtime.generate import load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.prompt import Conversation
    from qwen_vl_trt.runtime.request import Request, Sampling
    from qwen_vl_trt.runtime.scheduler import Engine, SeqRequest

    model = load_model(artifacts, "onnxruntime", ort_fused=False, io_binding=False)
    pre = Preprocessor(model.manifest)
    engine = Engine(model, prefill_budget=16)
    # HF's greedy applies the checkpoint's generation_config (this one has a repetition penalty of 1.05)
    greedy = Sampling(temperature=0).config(model.manifest.generation_config)
    img, frames = str(media["images"][0]), media["frames"]
    t1 = [{"role": "user", "content": [{"type": item}, {"type": "text", "text": "What do you see?"}]}]
    t2 = t1 + [{"role": "assistant", "content": "Coloured noise."},
               {"role": "user", "content": [{"type": "text", "text": "Which colour is most common?"}]}]
    if item == "image":
        hf_media, ours = {"images": [Image.open(img).convert("RGB")]}, ((img,), None)
    else:
        hf_media = {"videos": [frames], "cap_pixels_per_frame": False,
                    "video_metadata": [VideoMetadata(total_num_frames=len(frames), fps=VIDEO_FPS)]}
        ours = ((), str(media["frames_dir"]))
    previous = 0
    for turn, messages in enumerate((t1, t2)):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], return_tensors="pt", **hf_media)
        want = hf_greedy_new_tokens(hf_qwen2_5_vl, inputs, N_NEW)
        prep = pre.prepare(Request(Conversation(tuple(messages)), *ours))
        before = engine.cache_stats()
        request = engine.submit(SeqRequest(prep, N_NEW, greedy, ignore_eos=True))
        engine.run_until_idle()
        used = {k: v - before[k] for k, v in engine.cache_stats().items()}
        assert request.token_ids == want, f"turn {turn + 1}"
        if turn:
            assert previous <= used["prefix_cache_hits"] < prep.num_tokens
            assert used["encoder_cache_hits"] == 1 and used["encoder_cache_misses"] == 0
        previous = prep.num_tokens
