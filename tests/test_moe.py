"""Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration) against HF transformers, ONNX Runtime CPU, fp32.

- checkpoint: the tiny MoE checkpoint stores its experts in the release layout and HF reads them as intended;
  the spec reads both expert-count spellings; a bad expert tensor or top-k is one clear error;
- MoE block (export/moe.py) vs HF `Qwen3VLMoeTextSparseMoeBlock` for decode-sized and prefill-sized steps,
  with one and with several loop iterations; the tiling reads only the selected experts in decode;
- decoder.onnx: prefill with an image + 16 decode steps through the explicit cache vs HF, tied and untied
  (vision/embed graphs and the ragged batch of two are tests/test_export_qwen3_vl.py, parametrized by family);
- a checkpoint in HF's in-memory expert layout exports the same bytes as the release layout;
- end to end: export_all.sh / export_all, then trt-run greedy tokens == HF `generate` (32 tokens, EOS
  ignored) for one image, two images, a video and text only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_processor as H
from hf_reference import assert_prefill_and_decode_match_hf, prompt_with_pads, run, session
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.export.moe import TILES_PER_ITERATION, _tiles, sparse_moe_block
from qwen_vl_trt.export.onnx_graph import GraphBuilder
from qwen_vl_trt.model.errors import CheckpointError
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.export.weights import CheckpointWeights
from test_generate import N_NEW, hf_generate, media, run_cli_json, run_json  # noqa: F401 (media: a fixture)
from tolerances import FP32_ATOL

ROOT = Path(__file__).resolve().parents[1]
LAYER0 = "model.language_model.layers.0.mlp"


# ---- checkpoint and spec ----------------------------------------------------------------------------------
def test_checkpoint_stores_release_layout_and_hf_reads_it(qwen3_vl_moe_ckpt, hf_qwen3_vl_moe):
    spec = ModelSpec.from_checkpoint(qwen3_vl_moe_ckpt)
    moe, c = spec.text.moe, spec.text.hidden_size
    assert (moe.num_experts, moe.num_experts_per_tok, moe.mlp_only_layers) == (8, 2, (1,))
    assert 2 * moe.moe_intermediate_size != c and moe.moe_intermediate_size != c  # a transposed load cannot hide
    with safe_open(str(qwen3_vl_moe_ckpt / "model.safetensors"), framework="pt") as f:
        gate_up, down = (f.get_tensor(f"{LAYER0}.experts.{n}") for n in ("gate_up_proj", "down_proj"))
        assert "model.language_model.layers.1.mlp.gate_proj.weight" in f.keys()  # the dense mlp_only layer
    assert gate_up.shape == (8, c, 2 * moe.moe_intermediate_size) and down.shape == (8, moe.moe_intermediate_size, c)
    experts = hf_qwen3_vl_moe.model.language_model.layers[0].mlp.experts  # in-memory [E, 2I, C] / [E, C, I]
    assert torch.equal(experts.gate_up_proj, gate_up.transpose(1, 2))
    assert torch.equal(experts.down_proj, down.transpose(1, 2))
    assert [type(layer.mlp).__name__ for layer in hf_qwen3_vl_moe.model.language_model.layers] == [
        "Qwen3VLMoeTextSparseMoeBlock", "Qwen3VLMoeTextMLP", "Qwen3VLMoeTextSparseMoeBlock",
        "Qwen3VLMoeTextSparseMoeBlock"]
    assert [moe.is_sparse(i) for i in range(4)] == [True, False, True, True]


def test_spec_reads_both_expert_count_spellings(qwen3_vl_moe_ckpt, hf_qwen3_vl_moe):
    saved = json.loads((qwen3_vl_moe_ckpt / "config.json").read_text())
    assert "num_local_experts" in saved["text_config"]  # transformers 5.x save_pretrained
    released = json.loads(json.dumps(saved))
    released["text_config"]["num_experts"] = released["text_config"].pop("num_local_experts")  # config.json of 4.57
    t = hf_qwen3_vl_moe.config.text_config
    for cfg in (saved, released):
        moe = ModelSpec.from_config(cfg).text.moe
        assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size, moe.decoder_sparse_step) == \
            (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size, t.decoder_sparse_step)


def test_top_k_larger_than_the_experts_is_a_clear_error(qwen3_vl_moe_ckpt):
    cfg = json.loads((qwen3_vl_moe_ckpt / "config.json").read_text())
    cfg["text_config"]["num_experts_per_tok"] = 9
    with pytest.raises(CheckpointError) as err:
        ModelSpec.from_config(cfg)
    assert str(err.value) == "config.json: text_config.num_experts_per_tok 9 > num_experts 8"


def test_bad_expert_tensor_shape_is_a_clear_error(qwen3_vl_moe_ckpt, tmp_path):
    tensors = load_file(qwen3_vl_moe_ckpt / "model.safetensors")
    tensors[f"{LAYER0}.experts.down_proj"] = tensors[f"{LAYER0}.experts.down_proj"][:, :20].contiguous()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((qwen3_vl_moe_ckpt / "config.json").read_bytes())
    with pytest.raises(CheckpointError) as err:
        export_graphs(tmp_path, tmp_path / "g", "fp32", graphs=("decoder",))
    assert str(err.value) == (f"{tmp_path}: {LAYER0}.experts.down_proj has shape [8, 20, 64]; expected [8, 24, 64] "
                              "(release layout) or [8, 64, 24] (transformers 5.x layout)")


def test_in_memory_layout_checkpoint_exports_the_same_graph(qwen3_vl_moe_fp32_graphs, hf_qwen3_vl_moe, tmp_path):
    """HF's own save_pretrained writes [E, 2I, C] / [E, C, I]; the export reads it as HF does, same bytes."""
    hf_qwen3_vl_moe.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        assert f.get_slice(f"{LAYER0}.experts.gate_up_proj").get_shape() == [8, 48, 64]
    export_graphs(tmp_path / "ckpt", tmp_path / "g", "fp32", graphs=("decoder",))
    for suffix in (".onnx", ".onnx.data"):
        assert (tmp_path / "g" / f"decoder{suffix}").read_bytes() == \
            (qwen3_vl_moe_fp32_graphs / f"decoder{suffix}").read_bytes()


# ---- the MoE block -----------------------------------------------------------------------------------------
def _block_session(ckpt, path: Path, tiles_per_iteration: int):
    spec = ModelSpec.from_checkpoint(ckpt)
    g = GraphBuilder("moe_block", None, "float32")
    n = g.input("n", "float32", ["batch", "seq", spec.text.hidden_size])
    g.output(sparse_moe_block(g, CheckpointWeights(ckpt), n, LAYER0, spec, tiles_per_iteration), "y", "float32",
             ["batch", "seq", spec.text.hidden_size])
    g.finish(path)
    return session(path)


@pytest.mark.parametrize("tiles", [TILES_PER_ITERATION, 2, 1], ids=["default", "2_tiles", "1_tile"])
def test_moe_block_matches_hf(tiles, qwen3_vl_moe_ckpt, hf_qwen3_vl_moe, tmp_path):
    """Decode-sized (1-2 tokens) and prefill-sized (11-111 tokens) steps; 2 or 1 tiles per iteration make the
    loop run several times with padding tiles (the tiny model has 8 experts, fewer than the default 16)."""
    sess = _block_session(qwen3_vl_moe_ckpt, tmp_path / "block.onnx", tiles)
    block = hf_qwen3_vl_moe.model.language_model.layers[0].mlp
    gen = torch.Generator().manual_seed(tiles)
    for b, s in [(1, 1), (2, 1), (1, 5), (2, 11), (3, 37)]:
        x = 8 * torch.randn(b, s, 64, generator=gen)  # scaled so the block's outputs are O(1)
        with torch.no_grad():
            ref = block(x).numpy()
        assert np.abs(ref).max() > 0.5
        np.testing.assert_allclose(run(sess, {"n": x.numpy()})["y"], ref, rtol=0, atol=FP32_ATOL)


def _tile_tables(ids: np.ndarray, num_experts: int, tiles: int, tmp_path: Path):
    g = GraphBuilder("tiles", None, "float32")
    table, experts, n_iter = _tiles(g, g.input("ids", "int64", ["a"]), num_experts, tiles)
    for value, name, dims in ((table, "table", ["n_iter", "g", "t"]), (experts, "experts", ["n_iter", "g"]),
                              (n_iter, "n_iter", [])):
        g.output(value, name, "int64", dims)
    g.finish(tmp_path / "tiles.onnx")
    out = run(session(tmp_path / "tiles.onnx"), {"ids": ids})
    return out["table"], out["experts"], int(out["n_iter"])


@pytest.mark.parametrize("tokens,tiles", [(1, 16), (4, 16), (16, 16), (16, 4), (64, 16), (300, 16)])
def test_tiles_read_only_selected_experts(tokens, tiles, tmp_path):
    """The tiling of 128-expert top-8 routing (the releases'): every assignment in exactly one slot of a tile
    of its own expert; the experts read are exactly the selected ones; one iteration for a decode token;
    decode-sized steps read each expert hit once, larger ones at most twice; fewer padding tiles than
    iterations."""
    rng = np.random.default_rng(tokens)
    e, k = 128, 8
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(tokens)]).reshape(-1)
    table, experts, n_iter = _tile_tables(ids, e, tiles, tmp_path)
    a = ids.size
    assert table.shape[:2] == experts.shape == (n_iter, table.shape[1])
    filled = table[table < a]
    assert sorted(filled.tolist()) == list(range(a))  # each assignment once
    slot_expert = np.broadcast_to(experts[..., None], table.shape)
    assert (ids[table[table < a]] == slot_expert[table < a]).all()  # a slot holds its tile's expert
    assert set(experts.reshape(-1).tolist()) == set(ids.tolist())  # only selected experts are gathered
    hit, rows = len(set(ids.tolist())), table.shape[2]
    real_tiles = int((table.reshape(-1, rows) < a).any(1).sum())
    if a <= e:  # decode-sized: T = the largest load, one tile per expert hit (each read once)
        assert rows == np.bincount(ids).max() and real_tiles == hit
    else:  # T = the mean load of a hit expert, at most 2 tiles per expert hit
        assert rows == -(-a // hit) and real_tiles <= 2 * hit
    assert n_iter == -(-real_tiles // tiles)
    assert real_tiles <= experts.size < real_tiles + n_iter  # gathered slices: the tiles + a few padding tiles
    if tokens == 1:
        assert n_iter == 1 and rows == 1 and sorted(experts.reshape(-1).tolist()) == sorted(ids.tolist())


# ---- decoder -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tied_artifacts(qwen3_vl_moe_tied_ckpt, tmp_path_factory):
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits

    out = tmp_path_factory.mktemp("qwen3_vl_moe_tied_artifacts")
    export_all(qwen3_vl_moe_tied_ckpt, out, "fp32", Limits(max_batch=2, max_seq=512, max_cache_len=1024))
    return out


@pytest.fixture(scope="module")
def hf_tied(qwen3_vl_moe_tied_ckpt):
    import transformers

    return transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(qwen3_vl_moe_tied_ckpt,
                                                                           dtype="float32").eval()


@pytest.mark.parametrize("tied,decoder", [(False, "decoder.onnx"), (True, "decoder.onnx"), (False, "decoder.ort.onnx")],
                         ids=["untied", "tied", "untied_ort_fused"])
def test_decoder_prefill_and_16_decode_steps_match_hf(tied, decoder, request):
    if tied:
        ckpt, graphs, hf = (request.getfixturevalue(n) for n in ("qwen3_vl_moe_tied_ckpt", "tied_artifacts", "hf_tied"))
    else:
        ckpt, graphs, hf = (request.getfixturevalue(n) for n in
                            ("qwen3_vl_moe_ckpt", "qwen3_vl_moe_fp32_graphs", "hf_qwen3_vl_moe"))
    spec = ModelSpec.from_checkpoint(ckpt)
    assert spec.text.tie_word_embeddings == tied == hf.config.tie_word_embeddings
    torch.manual_seed(1)
    worst = assert_prefill_and_decode_match_hf(hf, graphs, spec, prompt_with_pads(spec, [35]),
                                               torch.tensor([[1, 14, 10]]), torch.randn(140, 1536), steps=16,
                                               atol=FP32_ATOL, decoder=decoder)
    assert worst <= FP32_ATOL


# ---- end to end --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(qwen3_vl_moe_ckpt, tmp_path_factory):
    """export_all.sh on the MoE checkpoint, the same command as for Qwen3-VL (model type from config.json)."""
    out = tmp_path_factory.mktemp("qwen3_vl_moe_artifacts")
    r = subprocess.run(["bash", str(ROOT / "export_all.sh"), str(qwen3_vl_moe_ckpt), str(out), "--dtype", "fp32",
                        "--no-engines", "--max-batch", "2", "--max-seq", "512", "--max-cache-len", "1024"],
                       capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["model_type"] == "qwen3_vl_moe"
    return out


@pytest.fixture(scope="module")
def processor(qwen3_vl_moe_ckpt):
    return H.qwen3_processor(qwen3_vl_moe_ckpt)


E2E = [  # (trt-run flags, prompt, images, video, system)
    (["--image", "{img0}"], "Describe this image.", [0], False, None),
    (["--image", "{img0}", "--image", "{img1}", "--system", "You are terse."], "Compare them.", [0, 1], False,
     "You are terse."),
    (["--video", "{frames}"], "What happens?", [], True, None),
    ([], "Write a haiku about GPUs.", [], False, None),
]


@pytest.mark.parametrize("flags,prompt,images,video,system", E2E, ids=["one_image", "two_images", "video", "text"])
def test_trt_run_greedy_tokens_match_hf_generate(flags, prompt, images, video, system, artifacts, media,
                                                 hf_qwen3_vl_moe, processor):
    paths = {"img0": media["images"][0], "img1": media["images"][1], "frames": media["frames_dir"]}
    ours = run_json(artifacts, *[f.format(**paths) for f in flags], "--prompt", prompt)
    ref = hf_generate(hf_qwen3_vl_moe, processor, prompt, [media["images"][i] for i in images],
                      frames=media["frames"] if video else None, system=system)
    assert len(ours["token_ids"]) == N_NEW
    assert ours["token_ids"] == ref


def test_trt_run_cli_tied_checkpoint_matches_hf(tied_artifacts, media, hf_tied, processor):
    """The console entry point on export_all' output of the tied checkpoint (same tokenizer files)."""
    ours = run_cli_json(tied_artifacts, "--image", str(media["images"][1]))
    assert ours["token_ids"] == hf_generate(hf_tied, processor, "Describe this image.", [media["images"][1]])
