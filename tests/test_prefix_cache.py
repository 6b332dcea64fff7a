"""Prefix and encoder caches in the in-flight engine (runtime/prefix_cache.py, runtime/encoder_cache.py,
runtime/scheduler.py): with both on, every request's greedy tokens equal HF `generate` for that request alone.

Artifacts and media: the tiny fp32 Qwen3-VL of tests/test_generate.py (max batch 2, cache 1024) and its random
images and frames, plus an image of img0's size with other pixels and img0 resized to another grid. Reference: HF
greedy (EOS off) on inputs from HF's processor and its chat template for the same messages (multi-turn chats
carry fixed assistant answers, as a chat client resends them). Token ids are compared exactly, as in
tests/test_scheduler.py (fp32, far-apart top logits). The hit counters are checked against values derived by hand
from the prompts' token ids (where the first pad token is, how long the shared turn is).

Every case runs on the three graph flavours of tests/test_scheduler.py: decoder.ort.onnx (GroupQueryAttention
continuing the slot's rows in place, chunks of PREFILL_BUDGET tokens), decoder.onnx with ping-pong KV sets (the
rest of a prompt in one call, read from the other set) and with numpy I/O (chunks of PREFILL_BUDGET tokens:
chunked prefill after a cached prefix, DeepStack rows sliced at the chunk's offsets).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hf_reference import hf_greedy_new_tokens
from test_generate import VIDEO_FPS, artifacts, media, processor  # noqa: F401 (fixtures)
from test_scheduler import FLAVOURS

N_NEW = 12
PREFILL_BUDGET = 16  # small: the rest of a prompt after its cached prefix goes in several calls, through images
SYSTEM = ("You are a careful assistant who looks at every picture closely, names the colours you see, says where "
          "they are, and answers in one short sentence unless asked for more detail.")
A1, A2 = "A noisy pattern of many colours.", "Mostly green and purple dots."


def user(*items, text):
    return {"role": "user", "content": [{"type": kind} for kind in items] + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def extra_images(media, tmp_path_factory):  # noqa: F811
    """img0's size with other pixels (same pad token ids, other content); img0 resized to another grid."""
    d = tmp_path_factory.mktemp("prefix_media")
    first = Image.open(media["images"][0]).convert("RGB")
    rng = np.random.default_rng(23)
    other = d / "other.png"
    Image.fromarray(rng.integers(0, 256, (first.height, first.width, 3), dtype=np.uint8)).save(other)
    smaller = d / "smaller.png"
    first.resize((first.width // 2, first.height // 2), Image.BICUBIC).save(smaller)
    return {"other": str(other), "smaller": str(smaller)}


def chats(media, extra):  # noqa: F811
    """name -> (messages, image paths, video?)."""
    img0, img1 = (str(p) for p in media["images"][:2])
    t1 = [user("image", text="Describe this image.")]
    t2 = t1 + [assistant(A1), user(text="What colour is the top left corner?")]
    two = [user("image", "image", text="Compare them.")]
    vid = [user("video", text="What happens?")]
    return {
        "img_t1": (t1, (img0,), False),
        "img_t2": (t2, (img0,), False),
        "img_t3": (t2 + [assistant(A2), user(text="And the bottom right?")], (img0,), False),
        "two_t1": (two, (img0, img1), False),
        "two_t2": (two + [assistant(A1), user(text="Which is brighter?")], (img0, img1), False),
        "vid_t1": (vid, (), True),
        "vid_t2": (vid + [assistant(A2), user(text="What changes between frames?")], (), True),
        "other_img": (t1, (extra["other"],), False),  # img_t1's text, another image of the same size
        "smaller_img": (t1, (extra["smaller"],), False),  # img_t1's text, img0 at another size
        "sys_text": ([{"role": "system", "content": SYSTEM}, user(text="Hi.")], (), False),
        "sys_img": ([{"role": "system", "content": SYSTEM}, user("image", text="What is this?")], (img0,), False),
    }


@pytest.fixture(scope="module")
def hf_inputs(media, extra_images, processor):  # noqa: F811
    """name -> HF processor outputs (torch tensors) of that request."""
    from transformers.video_utils import VideoMetadata

    out = {}
    for name, (messages, images, video) in chats(media, extra_images).items():
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        kwargs = {"images": [Image.open(p).convert("RGB") for p in images]} if images else {}
        if video:
            frames = media["frames"]
            kwargs.update(videos=[frames], video_metadata=[VideoMetadata(total_num_frames=len(frames), fps=VIDEO_FPS)],
                          cap_pixels_per_frame=False)
        out[name] = processor(text=[text], return_tensors="pt", **kwargs)
    return out


@pytest.fixture(scope="module")
def hf_tokens(hf_inputs, hf_qwen3_vl):
    """name -> HF's N_NEW greedy tokens for that request alone."""
    return {name: hf_greedy_new_tokens(hf_qwen3_vl, inputs, N_NEW) for name, inputs in hf_inputs.items()}


@pytest.fixture(scope="module", params=list(FLAVOURS))
def model(request, artifacts):  # noqa: F811
    from qwen_vl_trt.runtime.generate import load_model

    return load_model(artifacts, "onnxruntime", **FLAVOURS[request.param])


@pytest.fixture(scope="module")
def prepared(artifacts, media, extra_images):  # noqa: F811
    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.prompt import Conversation
    from qwen_vl_trt.runtime.request import Request

    pre = Preprocessor(load_manifest(artifacts))
    return {name: pre.prepare(Request(Conversation(tuple(messages)), images, str(media["frames_dir"]) if video
                                      else None))
            for name, (messages, images, video) in chats(media, extra_images).items()}


def seq(prepared, name):
    from qwen_vl_trt.runtime.sampling import SamplingConfig
    from qwen_vl_trt.runtime.scheduler import SeqRequest

    return SeqRequest(prepared[name], N_NEW, SamplingConfig(temperature=0), ignore_eos=True)


def engine_for(model, **kw):
    from qwen_vl_trt.runtime.scheduler import Engine

    return Engine(model, prefill_budget=PREFILL_BUDGET, **kw)


def run_alone(engine, request) -> dict:
    """Submit one request, step until the engine is idle -> the change of every cache counter."""
    before = engine.cache_stats()
    engine.submit(request)
    engine.run_until_idle()
    return {k: v - before[k] for k, v in engine.cache_stats().items()}


def first_pad(prep, model) -> int:
    ids = prep.input_ids
    return int(np.flatnonzero((ids == model.spec.image_token_id) | (ids == model.spec.video_token_id))[0])


@pytest.mark.parametrize("order_seed", [0, 1, 2])
def test_random_arrivals_with_caches_match_hf_alone(model, prepared, hf_tokens, order_seed):
    """Every case at random steps in random order through one engine (2 slots, caches on): each request's tokens
    == HF's for it alone, and both caches were used."""
    from test_scheduler import drive

    rng = np.random.default_rng(order_seed)
    names = list(rng.permutation(list(hf_tokens)))
    reqs = {name: seq(prepared, name) for name in names}
    engine = engine_for(model)
    drive(engine, list(zip(np.sort(rng.integers(0, 60, len(names))), (reqs[n] for n in names))))
    for name in names:
        assert reqs[name].token_ids == hf_tokens[name], name
    stats = engine.cache_stats()
    assert stats["encoder_cache_hits"] > 0 and stats["prefix_cache_hits"] > 0


@pytest.mark.parametrize("calls", [1, 2, 3])
def test_decoder_ort_onnx_continues_a_prompt_split_in_calls(artifacts, prepared, hf_inputs, hf_qwen3_vl,  # noqa: F811
                                                            calls):
    """decoder.ort.onnx (GroupQueryAttention, total_sequence_length = cache_len for one sequence: export/ort_fused.py)
    writes sys_img's prompt into slot 1 in 1, 2 or 3 calls, each continuing the rows of the ones before (past =
    its start; cuts in the system prompt and in the middle of the image, DeepStack rows sliced alike): the last
    call's logits == HF's logits for the whole prompt within FP32_ATOL (tests/tolerances.py: fp32 against fp32,
    summation order only)."""
    import torch

    from qwen_vl_trt.runtime.backends.slots import prefill_slot
    from qwen_vl_trt.runtime.encoder_cache import encode_media
    from qwen_vl_trt.runtime.generate import embed, load_model
    from qwen_vl_trt.runtime.scheduler import Engine
    from tolerances import FP32_ATOL

    model = load_model(artifacts, "onnxruntime", **FLAVOURS["fused"])
    engine = Engine(model)
    assert engine.continuation == "chunks"
    prep = prepared["sys_img"]
    pad = first_pad(prep, model)
    pads = int(np.prod(prep.media[0].grid_thw)) // model.spec.vision.spatial_merge_size ** 2  # the image's pad run
    cuts = {1: [], 2: [pad // 2], 3: [pad // 2, pad + pads // 2]}[calls]
    whole = embed(model, prep.input_ids[None], *encode_media(model, prep.media, None))
    bounds = [0, *cuts, prep.num_tokens]
    for start, end in zip(bounds[:-1], bounds[1:]):
        feeds = {k: np.ascontiguousarray(v[..., start:end, :]) for k, v in whole.items()}
        feeds["position_ids"] = np.ascontiguousarray(prep.position_ids[:, None, start:end])
        logits = prefill_slot(engine.io, 1, feeds, start, last=end == prep.num_tokens)
    with torch.no_grad():
        want = hf_qwen3_vl(**hf_inputs["sys_img"]).logits[0, -1].float().numpy()
    np.testing.assert_allclose(logits, want, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("chat", [("img_t1", "img_t2", "img_t3"), ("two_t1", "two_t2"), ("vid_t1", "vid_t2")])
def test_multi_turn_chat_reuses_each_turn(model, prepared, hf_tokens, chat):
    """Turn k+1 of a chat reuses at least all of turn k's prompt rows (its tokens are turn k's prompt, then the
    assistant answer) and none of its media goes through the vision encoder again; tokens == HF alone."""
    engine = engine_for(model)
    for i, name in enumerate(chat):
        request = seq(prepared, name)
        used = run_alone(engine, request)
        assert request.token_ids == hf_tokens[name], name
        n_media = len(prepared[name].media)
        if i == 0:
            assert used["prefix_cache_hits"] == 0 and used["encoder_cache_misses"] == n_media
        else:
            assert prepared[chat[i - 1]].num_tokens <= used["prefix_cache_hits"] < prepared[name].num_tokens
            assert used["encoder_cache_hits"] == n_media and used["encoder_cache_misses"] == 0
        assert used["prefix_cache_queries"] == prepared[name].num_tokens


@pytest.mark.parametrize("other", ["other_img", "smaller_img"])
def test_another_image_with_the_same_text_does_not_hit(model, prepared, hf_tokens, other):
    """After img_t1, the same text with another image of the same size (identical token ids) or with img0 at
    another size: only the rows before the first pad token are reused, the vision encoder runs."""
    a, b = prepared["img_t1"], prepared[other]
    if other == "other_img":
        assert np.array_equal(a.input_ids, b.input_ids)  # only the pixels differ
    else:
        assert a.media[0].grid_thw != b.media[0].grid_thw
    engine = engine_for(model)
    run_alone(engine, seq(prepared, "img_t1"))
    request = seq(prepared, other)
    used = run_alone(engine, request)
    assert request.token_ids == hf_tokens[other]
    assert used["prefix_cache_hits"] == first_pad(b, model)
    assert used["encoder_cache_hits"] == 0 and used["encoder_cache_misses"] == 1


def test_a_prefix_that_ends_mid_image_is_cut_before_the_image(model, prepared, hf_tokens):
    """A cache entry holding img_t1's rows only up to the middle of its image: img_t2 reuses the rows before the
    image and no pad row (never part of an image), then gives HF's tokens."""
    engine = engine_for(model)
    run_alone(engine, seq(prepared, "img_t1"))
    (entry,) = engine.prefix_cache.entries.values()
    start = first_pad(prepared["img_t1"], model)
    mid = start + len(prepared["img_t1"].media[0].pixel_values) // 8  # inside the image's pad run
    keys, rows = entry.keys[:mid].copy(), {k: v[:, :mid].copy() for k, v in entry.rows.items()}
    engine.prefix_cache.entries.clear()
    engine.prefix_cache.used = 0
    engine.prefix_cache.insert(keys, rows)
    request = seq(prepared, "img_t2")
    used = run_alone(engine, request)
    assert used["prefix_cache_hits"] == start
    assert request.token_ids == hf_tokens["img_t2"]


def test_eviction_under_a_small_budget(model, prepared, hf_tokens):
    """A budget that holds one finished img_t1 sequence but not two: other_img (same length) evicts it;
    a later request finds only what is left, and every request still gives HF's tokens."""
    t = model.spec.text
    row = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * 4  # fp32 bytes of one token's KV
    one_turn = (prepared["img_t1"].num_tokens + N_NEW) * (row + 6 * 8)
    engine = engine_for(model, prefix_cache_mb=1.5 * one_turn / (1 << 20))
    for name in ("img_t1", "other_img"):
        request = seq(prepared, name)
        run_alone(engine, request)
        assert request.token_ids == hf_tokens[name]
    stats = engine.cache_stats()
    assert stats["prefix_cache_evictions"] >= 1 and stats["prefix_cache_bytes"] <= stats["prefix_cache_budget_bytes"]
    request = seq(prepared, "img_t2")  # img_t1's rows were evicted by other_img's: the text before the image
    used = run_alone(engine, request)
    assert used["prefix_cache_hits"] == first_pad(prepared["img_t2"], model)
    assert request.token_ids == hf_tokens["img_t2"]


def test_chunked_prefill_after_a_cached_system_prompt(model, prepared, hf_tokens, hf_inputs, hf_qwen3_vl,
                                                      monkeypatch):
    """sys_text leaves the system prompt's rows; sys_img reuses them and writes the rest -- the image, DeepStack
    rows included -- from that offset in calls of at most PREFILL_BUDGET tokens (one call with ping-pong sets):
    tokens == HF alone, and the first token's logits == HF's
    within FP32_ATOL (tests/tolerances.py; tokens alone miss a DeepStack row shifted by one: that was tried)."""
    import torch

    from qwen_vl_trt.runtime import scheduler
    from tolerances import FP32_ATOL

    engine = engine_for(model)
    first = seq(prepared, "sys_text")
    run_alone(engine, first)
    logits = []

    class Recording(scheduler.Sampler):
        def sample(self, rows):
            logits.append(np.array(rows[0], np.float32))
            return super().sample(rows)

    monkeypatch.setattr(scheduler, "Sampler", Recording)
    request = seq(prepared, "sys_img")
    used = run_alone(engine, request)
    with torch.no_grad():
        want = hf_qwen3_vl(**hf_inputs["sys_img"]).logits[0, -1].float().numpy()
    np.testing.assert_allclose(logits[0], want, rtol=0, atol=FP32_ATOL)
    a, b = prepared["sys_text"].input_ids, prepared["sys_img"].input_ids
    shared = int(np.flatnonzero(a[:len(b)] != b[:len(a)])[0])  # tokens up to "<|im_start|>user\n"
    assert used["prefix_cache_hits"] == shared and shared < first_pad(prepared["sys_img"], model)
    assert prepared["sys_img"].num_tokens - shared > 2 * PREFILL_BUDGET  # the rest takes several calls
    assert first.token_ids == hf_tokens["sys_text"] and request.token_ids == hf_tokens["sys_img"]


def test_caches_off(model, prepared, hf_tokens):
    """prefix_cache_mb=0 and encoder_cache_mb=0: nothing is kept or looked up; tokens == HF."""
    engine = engine_for(model, prefix_cache_mb=0, encoder_cache_mb=0)
    for name in ("img_t1", "img_t2"):
        request = seq(prepared, name)
        run_alone(engine, request)
        assert request.token_ids == hf_tokens[name]
    assert engine.prefix_cache is None and engine.encoder_cache is None
    assert all(v == 0 for v in engine.cache_stats().values())
