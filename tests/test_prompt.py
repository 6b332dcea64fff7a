"""Chat templates, prompt building and streaming detokenization (runtime/prompt.py) against HF.

References: `AutoTokenizer.from_pretrained(ckpt).apply_chat_template` (HF's jinja environment) for the
rendering, HF's `Qwen3VLProcessor` (tests/hf_processor.py) for full input_ids / mm_token_type_ids, and
`tokenizer.decode` for the streaming decoder. What the released templates render is checked against
hand-written strings (the released Qwen3-VL / Qwen2.5-VL Instruct behaviour, notes section 2).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import hf_processor as H
from qwen_vl_trt.export.demo_checkpoint import ASSETS, make_checkpoint
from qwen_vl_trt.runtime import preprocess as pp
from qwen_vl_trt.runtime import prompt as P
from qwen_vl_trt.runtime import video as V
from qwen_vl_trt.model.errors import ArtifactError, UserError

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("prompt_ckpt"), "qwen3_vl")


@pytest.fixture(scope="module")
def qwen2_5_dir(ckpt, tmp_path_factory):
    """The same tokenizer with the Qwen2.5-VL chat template."""
    d = tmp_path_factory.mktemp("qwen2_5_tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, d / name)
    shutil.copy(ASSETS / "qwen2_5_vl_chat_template.jinja", d / "chat_template.jinja")
    return d


@pytest.fixture(scope="module")
def hf_tok25(qwen2_5_dir):
    return H.tokenizer(qwen2_5_dir)


@pytest.fixture(scope="module")
def tok25(qwen2_5_dir):
    return P.Tokenizer(qwen2_5_dir)


@pytest.fixture(scope="module")
def hf_tok(ckpt):
    return H.tokenizer(ckpt)


@pytest.fixture(scope="module")
def tok(ckpt):
    return P.Tokenizer(ckpt)


@pytest.fixture(scope="module")
def processor(ckpt):
    return H.qwen3_processor(ckpt)


CONVERSATIONS = {
    "user_text": [{"role": "user", "content": "Hello!"}],
    "system_image": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    "two_images_video": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "and"},
                                                      {"type": "image_url", "image_url": "b"}, {"type": "video"},
                                                      {"type": "text", "text": " compare"}]}],
    "multi_turn": [{"role": "system", "content": [{"type": "text", "text": "Sys"}]},
                   {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
                   {"role": "assistant", "content": "A1 \u4f60\u597d"},
                   {"role": "system", "content": "late system"},
                   {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q2 {{ not jinja }}"}]},
                   {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "A2"}]}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("kwargs", [{"add_generation_prompt": True}, {"add_generation_prompt": False},
                                    {"add_generation_prompt": True, "add_vision_id": True}], ids=["gen", "nogen", "vision_id"])
def test_render_matches_hf_apply_chat_template(hf_tok, tok, hf_tok25, tok25, name, kwargs):
    messages = CONVERSATIONS[name]
    assert tok.render(messages, **kwargs) == hf_tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert tok25.render(messages, **kwargs) == hf_tok25.apply_chat_template(messages, tokenize=False, **kwargs)


def test_qwen3_template_renders_released_behaviour(tok):
    """Hand-checked: first system only (text items), user media, assistant text only, no default system."""
    assert tok.render(CONVERSATIONS["multi_turn"], add_generation_prompt=True) == (
        "<|im_start|>system\nSys<|im_end|>\n"
        f"<|im_start|>user\n{IMG}Q1<|im_end|>\n"
        "<|im_start|>assistant\nA1 \u4f60\u597d<|im_end|>\n"
        f"<|im_start|>user\n{VID}Q2 {{{{ not jinja }}}}<|im_end|>\n"
        "<|im_start|>assistant\nA2<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert tok.render(CONVERSATIONS["two_images_video"], add_vision_id=True) == (
        f"<|im_start|>user\nPicture 1: {IMG}andPicture 2: {IMG}Video 1: {VID} compare<|im_end|>\n<|im_start|>assistant\n")
    assert tok.render(CONVERSATIONS["user_text"]) == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


def test_qwen2_5_template_renders_released_behaviour(tok25):
    assert tok25.render(CONVERSATIONS["system_image"]) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{IMG}What is this?<|im_end|>\n<|im_start|>assistant\n")
    assert tok25.render(P.build_messages("Hi", n_images=1)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{IMG}Hi<|im_end|>\n<|im_start|>assistant\n")


def _frames_dir(tmp_path, n, h, w):
    rng = np.random.default_rng(n)
    d = tmp_path / "frames"
    d.mkdir()
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    for i, f in enumerate(frames):
        Image.fromarray(f).save(d / f"{i:03d}.png")
    return d, np.stack(frames)


@pytest.mark.parametrize("case", ["text_only", "one_image", "two_images", "video", "image_video"])
def test_input_ids_match_hf_processor(tmp_path, ckpt, tok, processor, case):
    from transformers.video_utils import VideoMetadata

    n_images = {"one_image": 1, "two_images": 2, "image_video": 1}.get(case, 0)
    video = case in ("video", "image_video")
    rng = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate([(120, 160), (300, 90)][:n_images]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    messages = P.build_messages("Describe \u00e9\u00e8 \U0001F600.", system="You are terse." if n_images == 1 else None,
                                n_images=n_images, video=video)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {"images": [str(p) for p in paths]} if paths else {}
    grids, video_grids, stamps = np.zeros((0, 3), np.int64), [], []
    if paths:
        _, grids = pp.preprocess_images([pp.load_image(p) for p in paths], pp.ImageProcessorConfig.from_dir(ckpt))
    if video:
        frames_dir, frames = _frames_dir(tmp_path, 21, 64, 96)
        vin = V.preprocess_video_qwen3(frames_dir, V.VideoProcessorConfig.from_dir(ckpt), frames_fps=5.0)
        video_grids, stamps = [vin.grid_thw], [vin.timestamps]
        kwargs.update(videos=[frames], video_metadata=[VideoMetadata(total_num_frames=21, fps=5.0)],
                      cap_pixels_per_frame=False)
    ref = processor(text=[text], return_tensors="np", **kwargs)
    ours = P.build_prompt(tok, messages, image_grids=grids, video_grids=video_grids, video_timestamps=stamps)
    assert ours.input_ids.dtype == np.int64 and ours.mm_token_type_ids.dtype == np.int64
    assert np.array_equal(ours.input_ids, ref["input_ids"][0])
    assert np.array_equal(ours.mm_token_type_ids, ref["mm_token_type_ids"][0])
    if video:
        # Qwen's reference form: each temporal patch has its own start/end pair and no outer pair wraps them
        first = f"<{stamps[0][0]:.1f} seconds><|vision_start|><|video_pad|>"
        assert first in ours.text and "<|vision_start|>" + first not in ours.text
        assert "<|vision_end|><|vision_end|>" not in ours.text
        assert ours.text.count(" seconds>") == video_grids[0][0] == ours.text.count("<|vision_start|>") - n_images


def test_qwen2_5_video_expansion_is_one_run(tok25):
    prompt = P.build_prompt(tok25, P.build_messages("What?", video=True), video_grids=[(4, 6, 8)], family="qwen2_5_vl")
    assert int((prompt.mm_token_type_ids == 2).sum()) == 4 * 6 * 8 // 4
    run = np.flatnonzero(prompt.mm_token_type_ids == 2)
    assert np.all(np.diff(run) == 1)


def test_placeholder_count_mismatch_is_user_error(tok):
    with pytest.raises(UserError, match=r"^prompt has 2 image and 0 video placeholders for 1 images and 0 videos; do not type"):
        P.build_prompt(tok, P.build_messages("look: <|image_pad|>", n_images=1), image_grids=[(1, 4, 4)])


def test_chat_template_sources(tmp_path, ckpt):
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(ckpt / "tokenizer.json", d / "tokenizer.json")
    with pytest.raises(ArtifactError, match=r"has no chat template"):
        P.Tokenizer(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}|{{ eos_token }}",
                                                         "eos_token": "<|im_end|>"}))
    assert P.Tokenizer(d).render([{"role": "user", "content": "x"}]) == "x|<|im_end|>"
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ messages | length }}"}))
    assert P.Tokenizer(d).render([{"role": "user", "content": "x"}]) == "json:1"


STREAM_TEXTS = ["Hello 世界! 😀🎉 naïve café — 日本語のテキスト 👩‍👩‍👧 done.",
                "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑ 🤖🤖 中文分词测试，标点。",
                "plain ascii only"]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_decoder_matches_decode(hf_tok, tok, text):
    ids = tok.encode(text)
    assert np.array_equal(ids, hf_tok(text)["input_ids"])
    ids = list(ids) + [151645]  # <|im_end|> is skipped as a special token
    dec = P.IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    expected = hf_tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == expected == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    if not text.isascii():  # the test really splits characters across tokens
        assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_incremental_decoder_keeps_special_tokens_when_asked(hf_tok, tok):
    ids = list(tok.encode("<|im_start|>assistant\n😀 ok<|im_end|>"))
    dec = P.IncrementalDecoder(tok, skip_special_tokens=False)
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text == hf_tok.decode(ids, skip_special_tokens=False)


def test_incremental_decoder_flushes_incomplete_tail(tok):
    ids = list(tok.encode(STREAM_TEXTS[1]))
    cut = next(k for k in range(1, len(ids) + 1) if tok.decode(ids[:k]).endswith("\ufffd"))
    dec = P.IncrementalDecoder(tok)
    streamed = "".join(dec.push(i) for i in ids[:cut])
    assert "\ufffd" not in streamed
    assert streamed + dec.flush() == tok.decode(ids[:cut])
