"""lm_head quantized (`--weights int4` includes it; `lm_head=int4|int8`): export/decoder.py `lm_head`, export/int4.py,
export/int8.py; the accuracy-level switch (`--int4-activations`, manifest.json, trt-run).

Reference: HF with lm_head's weight (the embedding table when tied: a separate copy, the embedding itself stays
dense as in embed.onnx) replaced by its quantized value computed here in numpy from the scheme's definition (INT4:
blocks of B hidden features per vocabulary row, scale = absmax / 7; INT8: one scale per vocabulary row, absmax /
127). Both then compute the same function in fp32, so the fp32 tolerance applies; the dense model is far away.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hf_reference import assert_prefill_and_decode_match_hf, graphs_prefill, hf_model, prompt_with_pads
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.export.int4 import to_matmul_nbits
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.weight_formats import WeightFormats
from test_int4 import BLOCK, CASES, hf_with_int4_projections
from tolerances import FP32_ATOL


def int4_rows(weight: np.ndarray, block: int) -> np.ndarray:
    """RTN symmetric INT4 value of a [V, C] table, blocks of `block` along C (numpy, from the definition)."""
    w = weight.astype(np.float32)
    v, c = w.shape
    blocks = w.reshape(v, c // block, block)
    scale = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(7)
    scale[scale == 0] = 1
    return (np.clip(np.round(blocks / scale), -8, 7) * scale).reshape(v, c)


def int8_rows(weight: np.ndarray) -> np.ndarray:
    w = weight.astype(np.float32)
    scale = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)
    scale[scale == 0] = 1
    return np.clip(np.round(w / scale), -128, 127) * scale


def with_quantized_lm_head(hf, fmt: str):
    table = hf.lm_head.weight.detach().numpy()
    q = int4_rows(table, BLOCK) if fmt == "int4" else int8_rows(table)
    hf.lm_head.weight = torch.nn.Parameter(torch.from_numpy(q))  # new Parameter: a tied embedding stays dense
    return hf


def _inputs(spec, family):
    grid_list, patch_dim = CASES[family]
    grid = torch.tensor(grid_list)
    torch.manual_seed(1)
    return prompt_with_pads(spec, [int(grid.prod()) // 4]), grid, torch.randn(int(grid.prod()), patch_dim)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("family,tied", [("qwen3_vl", False), ("qwen3_vl", True), ("qwen2_5_vl", True),
                                         ("qwen3_vl_moe", False)])
def test_quantized_lm_head_logits_match_numpy_reference(family, tied, fmt, request, tmp_path):
    ckpt = request.getfixturevalue(f"{family}_tied_ckpt" if tied else f"{family}_ckpt")
    export_graphs(ckpt, tmp_path, "fp32", formats=WeightFormats(lm_head=fmt, int4_block=BLOCK))
    model = onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert [n.name for n in dq] == ["/text/lm_head/DequantizeLinear"]
    assert not any(n.op_type == "Gemm" for n in model.graph.node)
    spec = ModelSpec.from_checkpoint(ckpt)
    hf = with_quantized_lm_head(hf_model(ckpt), fmt)
    decoders = ["decoder.onnx", "decoder.ort.onnx"]
    if fmt == "int4":  # the explicit MatMulNBits form a bf16 decoder.ort.onnx gets, here in fp32
        ort_model = onnx.load(str(tmp_path / "decoder.ort.onnx"), load_external_data=False)
        assert to_matmul_nbits(ort_model, tmp_path, tmp_path / "decoder.nbits.ort.onnx.data") == 1
        onnx.save_model(ort_model, str(tmp_path / "decoder.nbits.ort.onnx"))
        decoders.append("decoder.nbits.ort.onnx")
    for decoder in decoders:
        worst = assert_prefill_and_decode_match_hf(hf, tmp_path, spec, *_inputs(spec, family), steps=4,
                                                   atol=FP32_ATOL, decoder=decoder)
        assert worst <= FP32_ATOL
    ours, _ = graphs_prefill(tmp_path, spec, hf, *_inputs(spec, family))
    dense = hf_model(ckpt)
    ids, grid, pixels = _inputs(spec, family)
    from hf_reference import mm_token_type_ids

    with torch.no_grad():
        tt = mm_token_type_ids(ids, spec.image_token_id, spec.video_token_id)
        ref = dense(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=tt).logits[0, -1]
    assert np.abs(ours["logits"][0] - ref.numpy()).max() > 10 * FP32_ATOL  # the graph holds the quantized table


@pytest.mark.parametrize("ckpt_name", ["qwen3_vl_ckpt", "qwen3_vl_tied_ckpt"])
def test_int4_everywhere_generates_hf_tokens_on_dequantized_weights(ckpt_name, request, tmp_path):
    """`--weights int4` (projections and lm_head) through export_all and the runtime: greedy tokens == HF generate
    with the same dequantized weights; manifest.json records the formats, the decoder session runs at accuracy
    level 1."""
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    ckpt = request.getfixturevalue(ckpt_name)
    formats = WeightFormats.parse("int4", int4_block=BLOCK)
    art = export_all(ckpt, tmp_path / "art", "fp32", formats=formats).parent
    model = load_model(art, "onnxruntime")
    assert model.manifest.weight_formats() == formats
    opts = model.sessions["decoder"].sess.get_session_options()
    assert opts.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "1"
    req = Preprocessor(model.manifest).prepare(Request("Explain quantization."))
    ours = generate(model, [req], Sampler(SamplingConfig(temperature=0)), 16, ignore_eos=True)[0].token_ids
    hf = with_quantized_lm_head(hf_with_int4_projections(ckpt), "int4")
    with torch.no_grad():
        ids = torch.tensor([req.input_ids])
        ref = hf.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)
    # well posed: HF's top-2 logits 10x the fp32 tolerance apart at every step (the logits meet it, test above)
    assert min(float(s[0].topk(2).values.diff().abs()) for s in ref.scores) > 10 * FP32_ATOL
    assert ours == ref.sequences[0, ids.shape[1]:].tolist()


def test_int8_activations_switch_manifest_runtime_and_override(qwen3_vl_ckpt, tmp_path):
    """`--int4-activations int8` is recorded in manifest.json; ONNX Runtime's INT4 fusion then runs at accuracy
    level 4, which trt-run's `--int4-activations fp32` (load_model's `int4_activations`) overrides; a bf16
    decoder.ort.onnx's explicit MatMulNBits nodes carry level 4 too."""
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.runtime.generate import load_model

    formats = WeightFormats.parse("int4", int4_block=BLOCK, int4_activations="int8")
    art = export_all(qwen3_vl_ckpt, tmp_path / "art", "fp32", formats=formats).parent
    raw = json.loads((art / "manifest.json").read_text())
    assert raw["graphs"]["decoder"]["weights"]["int4_activations"] == "int8"
    assert WeightFormats.from_json(raw["graphs"]["embed"]["weights"]) == formats
    assert raw["graphs"]["vision"]["weights"] == "dense"
    key = "session.qdq_matmulnbits_accuracy_level"
    level = lambda m: m.sessions["decoder"].sess.get_session_options().get_session_config_entry(key)  # noqa: E731
    assert level(load_model(art, "onnxruntime")) == "4"
    assert level(load_model(art, "onnxruntime", int4_activations="fp32")) == "1"
    # what level 4 means: ONNX Runtime's fused graph carries it on every MatMulNBits, lm_head's included
    opts = ort.SessionOptions()
    opts.add_session_config_entry(key, "4")
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(art / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
    fused = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    nbits = [n for n in fused.graph.node if n.op_type == "MatMulNBits"]
    assert any("lm_head" in n.name for n in nbits)
    assert nbits and all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)

    bf16 = tmp_path / "bf16"
    export_graphs(qwen3_vl_ckpt, bf16, "bf16", graphs=("decoder",), formats=formats)
    model = onnx.load(str(bf16 / "decoder.ort.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    layers = ModelSpec.from_checkpoint(qwen3_vl_ckpt).text.num_hidden_layers
    # q|k|v, o, gate|up per layer (fused products: export/int4.py fuse_int4_products; down_proj's K = 37 stays
    # dense), lm_head
    assert len(nbits) == layers * 3 + 1
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)


@pytest.mark.parametrize("module", ["qwen_vl_trt.export.cli", "qwen_vl_trt.export.export_all"])
@pytest.mark.parametrize("flags,message", [
    (["--weights", "int3"], "error: --weights 'int3': 'int3' is not dense, fp8, int4 or GROUP=FORMAT"),
    (["--weights", "embedding=int4"], "error: --weights 'embedding=int4': embedding can be dense, not 'int4'"),
    (["--weights", "int4", "--int4-block-size", "48"], "error: --int4-block-size 48: use one of (16, 32, 64, 128)"),
    (["--int4-activations", "fp16"], "error: --int4-activations 'fp16': use fp32 or int8"),
])
def test_bad_weight_flags_are_one_error_line(module, flags, message, qwen3_vl_ckpt, tmp_path):
    args = [str(qwen3_vl_ckpt), str(tmp_path / "out"), *flags]
    if module.endswith("export_all"):
        args.append("--no-engines")
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_trt_run_int4_activations_flag_reaches_load_model(monkeypatch):
    """trt-run --int4-activations int8 -> RunConfig -> load_model(int4_activations="int8"); absent: None (the
    manifest's); another value: argparse refuses it (exit 2)."""
    from qwen_vl_trt.runtime.serve import cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_load_model(directory, backend, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr("qwen_vl_trt.runtime.generate.load_model", fake_load_model)
    for flags, want in (([], None), (["--int4-activations", "int8"], "int8")):
        cfg = cli.RunConfig.from_args(cli.parser().parse_args(["--prompt", "hi", *flags]))
        with pytest.raises(Stop):
            cli.run(cfg)
        assert seen["int4_activations"] == want
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(["--int4-activations", "int4"])
    assert e.value.code == 2
