"""Quantized MoE experts (`--weights experts=fp8|int4`, export/moe_quant.py + the `qwen_vl::MoEExperts` node of
export/plugin_ops.py) on ONNX Runtime CPU, fp32, against independent references:

- the stored bytes equal a numpy/ml_dtypes quantization written here from the definition (RTN e4m3 per block of 128
  along K with scale amax / 448; RTN int4 per block of 16 along K with scale amax / 7);
- the MoE block (the node's reference body: DequantizeLinear + today's expert Loop) equals HF's
  `Qwen3VLMoeTextSparseMoeBlock` whose experts hold those numpy-dequantized weights, and equals today's dense MoE
  block graph exported from a checkpoint holding the same dequantized weights;
- a checkpoint in Qwen's FP8 format keeps its expert bytes and scales (no re-quantization) and decodes like HF
  on the same FP8 checkpoint (HF cannot read fused FP8 experts, so its reference checkpoint holds the experts
  dequantized by HF's own `Fp8Dequantize`, as tests/test_fp8_checkpoints.py does);
- an INT4 block that does not divide K is one clear error.

Tolerance: FP32_ATOL (tests/tolerances.py): both sides compute in fp32 on identical weight values; only the
summation order differs.
"""
from __future__ import annotations


import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from safetensors.torch import load_file, save_file

from hf_reference import assert_prefill_and_decode_match_hf, hf_model, prompt_with_pads, run, session
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.export.decoder import export_decoder
from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_MOE_TINY, make_checkpoint
from qwen_vl_trt.export.moe import sparse_moe_block
from qwen_vl_trt.export.onnx_graph import GraphBuilder
from qwen_vl_trt.export.weights import CheckpointWeights
from qwen_vl_trt.model.errors import CheckpointError
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.weight_formats import WeightFormats
from tolerances import FP32_ATOL

LAYER0 = "model.language_model.layers.0.mlp"
INT4_BLOCK = 16  # moe_intermediate_size 48 and hidden 64 are multiples of it
FORMATS = {"fp8": WeightFormats(experts="fp8"), "int4": WeightFormats(experts="int4", int4_block=INT4_BLOCK)}


@pytest.fixture(scope="module")
def moe48_ckpt(tmp_path_factory):
    """The tiny Qwen3-VL-MoE with moe_intermediate_size 48 (K of down_proj a multiple of the INT4 block; 2I = 96 and
    I = 48 differ from C = 64, so a transposed expert cannot pass unnoticed)."""
    text = {**QWEN3_VL_MOE_TINY["text_config"], "moe_intermediate_size": 48}
    return make_checkpoint(tmp_path_factory.mktemp("qwen3_vl_moe48"), "qwen3_vl_moe", seed=3,
                           config_overrides={"text_config": text})


# ---- numpy references of the two quantizations (from the definitions in export/moe_quant.py's docstring) ------
def _blocks(wt: np.ndarray, block: int) -> np.ndarray:
    """[E, K, N] -> [E, ceil(K/B), B, N], zero-padded along K."""
    e, k, n = wt.shape
    kb = -(-k // block)
    return np.pad(wt, ((0, 0), (0, kb * block - k), (0, 0))).reshape(e, kb, block, n)


def ref_fp8(wt: np.ndarray, block: int = 128):
    s = (np.abs(_blocks(wt, block)).max(axis=2) / np.float32(448)).astype(np.float32)
    s[s == 0] = 1
    per_k = np.repeat(s, block, axis=1)[:, : wt.shape[1]]
    q = np.clip(wt / per_k, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, s, q.astype(np.float32) * per_k


def ref_int4(wt: np.ndarray, block: int = INT4_BLOCK):
    s = (np.abs(_blocks(wt, block)).max(axis=2) / np.float32(7)).astype(np.float32)
    s[s == 0] = 1
    per_k = np.repeat(s, block, axis=1)
    q = np.clip(np.rint(wt / per_k), -8, 7).astype(np.int8)
    return q, s, q.astype(np.float32) * per_k


REFS = {"fp8": ref_fp8, "int4": ref_int4}


def _release(ckpt) -> dict:
    t = load_file(ckpt / "model.safetensors")
    return {n: t[f"{LAYER0}.experts.{n}"].float().numpy() for n in ("gate_up_proj", "down_proj")}


def _block_graph(ckpt, path, formats: WeightFormats):
    spec = ModelSpec.from_checkpoint(ckpt)
    g = GraphBuilder("moe_block", None, "float32")
    g.formats = formats
    n = g.input("n", "float32", ["batch", "seq", spec.text.hidden_size])
    g.output(sparse_moe_block(g, CheckpointWeights(ckpt), n, LAYER0, spec), "y", "float32",
             ["batch", "seq", spec.text.hidden_size])
    g.finish(path)
    return path


def _initializer(model: onnx.ModelProto, suffix: str) -> np.ndarray:
    (t,) = [t for t in model.graph.initializer if t.name.endswith(suffix)]
    if t.data_type == TensorProto.INT4:
        return numpy_helper.to_array(t).astype(np.int8)
    if t.data_type == TensorProto.FLOAT8E4M3FN:
        return np.frombuffer(t.raw_data, ml_dtypes.float8_e4m3fn).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def _steps(seed: int):
    gen = torch.Generator().manual_seed(seed)
    for b, s in [(1, 1), (2, 1), (1, 5), (2, 11), (3, 37)]:  # decode-sized and prefill-sized steps
        yield 8 * torch.randn(b, s, 64, generator=gen)  # scaled so the block's outputs are O(1)


# ---- the block ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_quantized_block_stores_the_reference_quantization_and_matches_hf(fmt, moe48_ckpt, tmp_path):
    path = _block_graph(moe48_ckpt, tmp_path / "block.onnx", FORMATS[fmt])
    model = onnx.load(str(path))
    [node] = [n for n in model.graph.node if n.op_type == "MoEExperts"]
    assert node.domain == "qwen_vl" and [f.name for f in model.functions] == ["MoEExperts"]
    dequantized = {}
    for name, wt in _release(moe48_ckpt).items():
        q, s, dequantized[name] = REFS[fmt](wt)
        stored_q = _initializer(model, f"{name}.{fmt}")
        assert stored_q.dtype == q.dtype and stored_q.shape == wt.shape
        np.testing.assert_array_equal(stored_q.view(np.uint8) if fmt == "fp8" else stored_q,
                                      q.view(np.uint8) if fmt == "fp8" else q)  # bit for bit
        np.testing.assert_array_equal(_initializer(model, f"{name}.scale"), s)
    assert np.abs(dequantized["down_proj"] - _release(moe48_ckpt)["down_proj"]).max() > 1e-4  # really quantized

    hf = hf_model(moe48_ckpt)
    block = hf.model.language_model.layers[0].mlp
    with torch.no_grad():  # HF's block on the reference-dequantized experts (in-memory layout [E, N, K])
        block.experts.gate_up_proj.copy_(torch.from_numpy(dequantized["gate_up_proj"]).transpose(1, 2))
        block.experts.down_proj.copy_(torch.from_numpy(dequantized["down_proj"]).transpose(1, 2))
    sess = session(path)
    for x in _steps(1):
        with torch.no_grad():
            ref = block(x).numpy()
        assert np.abs(ref).max() > 0.5
        np.testing.assert_allclose(run(sess, {"n": x.numpy()})["y"], ref, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_plugin_body_equals_the_dense_block_on_dequantized_weights(fmt, moe48_ckpt, tmp_path):
    """The MoEExperts reference body == today's dense MoE block exported from a checkpoint whose experts are the
    dequantized values (the same fp32 Loop on the same numbers)."""
    ckpt = tmp_path / "dequantized"
    ckpt.mkdir()
    for f in moe48_ckpt.iterdir():
        if f.is_file():
            (ckpt / f.name).write_bytes(f.read_bytes())
    tensors = load_file(ckpt / "model.safetensors")
    for name, wt in _release(moe48_ckpt).items():
        tensors[f"{LAYER0}.experts.{name}"] = torch.from_numpy(REFS[fmt](wt)[2])
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    quantized = session(_block_graph(moe48_ckpt, tmp_path / "q.onnx", FORMATS[fmt]))
    dense = session(_block_graph(ckpt, tmp_path / "dense.onnx", WeightFormats()))
    for x in _steps(2):
        np.testing.assert_allclose(run(quantized, {"n": x.numpy()})["y"], run(dense, {"n": x.numpy()})["y"],
                                   rtol=0, atol=1e-6)


def test_int4_block_must_divide_the_input_features(qwen3_vl_moe_ckpt, tmp_path):
    """The default tiny MoE has moe_intermediate_size 24: down_proj's K = 24 is not a multiple of 16."""
    with pytest.raises(CheckpointError) as err:
        _block_graph(qwen3_vl_moe_ckpt, tmp_path / "b.onnx", FORMATS["int4"])
    assert str(err.value) == (f"{LAYER0}.experts.down_proj: 24 input features are not a multiple of the INT4 block 16 "
                              "(TensorRT takes whole blocks); choose --int4-block-size dividing 24")


# ---- a Qwen FP8 checkpoint: experts keep their bytes -------------------------------------------------------
def test_fp8_checkpoint_keeps_expert_bytes_and_decodes_like_hf(qwen3_vl_moe_ckpt, tmp_path):
    """Qwen's FP8 format in 8x8 blocks (every expert dim of the tiny model is a multiple of 8): the decoder's expert
    initializers are the checkpoint's e4m3 bytes, its scales the checkpoint's block scales repeated along N; prefill
    with an image + 8 greedy decode steps match HF (fp32) on the same checkpoint within FP32_ATOL at every step."""
    from test_fp8_checkpoints import GRID, PATCH_DIM, _fp8_checkpoint

    ckpt = _fp8_checkpoint(qwen3_vl_moe_ckpt, tmp_path / "fp8", block=8)
    reference = _fp8_checkpoint(qwen3_vl_moe_ckpt, tmp_path / "ref", block=8, experts_dequantized_by_hf=True)
    graphs = tmp_path / "graphs"
    spec = export_graphs(ckpt, graphs, "fp32", graphs=("vision", "embed"))["spec"]
    export_decoder(spec, CheckpointWeights(ckpt), graphs, "float32", formats=WeightFormats.parse("experts=fp8"))
    model = onnx.load(str(graphs / "decoder.onnx"))
    stored = load_file(ckpt / "model.safetensors")
    sparse = [i for i in range(spec.text.num_hidden_layers) if spec.text.moe.is_sparse(i)]
    assert sum(n.op_type == "MoEExperts" for n in model.graph.node) == len(sparse) == 3
    for i in sparse:
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.language_model.layers.{i}.mlp.experts.{name}"
            q, grid = stored[key], stored[key + "_scale_inv"].numpy()  # [E, K, N] e4m3, [E, K/8, N/8]
            assert q.dtype == torch.float8_e4m3fn
            np.testing.assert_array_equal(_initializer(model, f"{key}.fp8").view(np.uint8), q.view(torch.uint8).numpy())
            np.testing.assert_array_equal(_initializer(model, f"{key}.scale"), np.repeat(grid, 8, axis=2))
    hf = hf_model(reference)
    grid = torch.tensor(GRID["qwen3_vl_moe"])
    torch.manual_seed(1)
    pixels = torch.randn(int(grid.prod()), PATCH_DIM["qwen3_vl_moe"])
    ids = prompt_with_pads(spec, [int(grid.prod()) // 4])
    worst = assert_prefill_and_decode_match_hf(hf, graphs, spec, ids, grid, pixels, steps=8, atol=FP32_ATOL)
    assert worst <= FP32_ATOL


# ---- the decoder, both ONNX Runtime flavours, vs HF on the dequantized weights -------------------------------
@pytest.fixture(scope="module")
def int4_graphs(moe48_ckpt, tmp_path_factory):
    """fp32 vision/embed + decoder.onnx with INT4 experts (block 16) + decoder.ort.onnx (QMoE) of moe48."""
    from qwen_vl_trt.export.ort_fused import write_fused

    out = tmp_path_factory.mktemp("moe48_int4_graphs")
    spec = export_graphs(moe48_ckpt, out, "fp32", graphs=("vision", "embed"))["spec"]
    write_fused(export_decoder(spec, CheckpointWeights(moe48_ckpt), out, "float32", formats=FORMATS["int4"]), spec)
    return out


def test_ort_fused_decoder_runs_int4_experts_as_qmoe(int4_graphs):
    model = onnx.load(str(int4_graphs / "decoder.ort.onnx"), load_external_data=False)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("com.microsoft", "QMoE")) == 3 and ("qwen_vl", "MoEExperts") not in ops
    assert not any(n.op_type == "Loop" for n in model.graph.node)
    assert "MoEExperts" not in [f.name for f in model.functions]
    qmoe = next(n for n in model.graph.node if n.op_type == "QMoE")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe.attribute}
    assert (attrs["k"], attrs["block_size"], attrs["swiglu_fusion"], attrs["normalize_routing_weights"],
            attrs["activation_type"], attrs["activation_alpha"], attrs["activation_beta"]) == \
        (2, 16, 1, 1, b"swiglu", 1, 0)


@pytest.mark.parametrize("decoder", ["decoder.onnx", "decoder.ort.onnx"], ids=["reference_body", "qmoe"])
def test_int4_experts_decoder_matches_hf_on_dequantized_weights(decoder, int4_graphs, moe48_ckpt):
    """Prefill with an image + 8 greedy decode steps: HF with every sparse layer's experts set to the numpy
    dequantization of their INT4 blocks vs our decoder (the MoEExperts body, or ONNX Runtime's QMoE)."""
    from test_fp8_checkpoints import GRID, PATCH_DIM

    spec = ModelSpec.from_checkpoint(moe48_ckpt)
    hf = hf_model(moe48_ckpt)
    tensors = load_file(moe48_ckpt / "model.safetensors")
    for i, layer in enumerate(hf.model.language_model.layers):
        if not spec.text.moe.is_sparse(i):
            continue
        key = f"model.language_model.layers.{i}.mlp.experts"
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                deq = ref_int4(tensors[f"{key}.{name}"].float().numpy())[2]
                getattr(layer.mlp.experts, name).copy_(torch.from_numpy(deq).transpose(1, 2))
    grid = torch.tensor(GRID["qwen3_vl_moe"])
    torch.manual_seed(1)
    pixels = torch.randn(int(grid.prod()), PATCH_DIM["qwen3_vl_moe"])
    ids = prompt_with_pads(spec, [int(grid.prod()) // 4])
    worst = assert_prefill_and_decode_match_hf(hf, int4_graphs, spec, ids, grid, pixels, steps=8, atol=FP32_ATOL,
                                               decoder=decoder)
    assert worst <= FP32_ATOL


def test_fp8_checkpoint_in_hf_memory_layout_keeps_the_same_bytes(qwen3_vl_moe_ckpt, tmp_path):
    """The same FP8 experts stored in HF's in-memory layout ([E, N, K] and a [E, N/b, K/b] grid, as save_pretrained
    writes them) export to the same expert initializers as the release layout (the block axes swap with them)."""
    from test_fp8_checkpoints import _fp8_checkpoint

    release = _fp8_checkpoint(qwen3_vl_moe_ckpt, tmp_path / "release", block=8)
    in_memory = tmp_path / "in_memory"
    in_memory.mkdir()
    for f in release.iterdir():
        if f.is_file():
            (in_memory / f.name).write_bytes(f.read_bytes())
    tensors = load_file(in_memory / "model.safetensors")
    for k in [k for k in tensors if ".experts." in k]:
        tensors[k] = tensors[k].transpose(1, 2).contiguous()  # q [E, K, N] -> [E, N, K]; grid likewise
    save_file(tensors, in_memory / "model.safetensors", metadata={"format": "pt"})
    spec = ModelSpec.from_checkpoint(release)
    fmt = WeightFormats.parse("experts=fp8")
    models = {}
    for name, ckpt in (("release", release), ("in_memory", in_memory)):
        export_decoder(spec, CheckpointWeights(ckpt), tmp_path / name, "float32", formats=fmt)
        models[name] = onnx.load(str(tmp_path / name / "decoder.onnx"))
    experts = [t.name for t in models["release"].graph.initializer if ".experts." in t.name]
    assert len(experts) == 3 * 2 * 2  # 3 sparse layers x (gate_up, down) x (values, scale)
    for name in experts:
        a, b = (_initializer(models[m], name) for m in ("release", "in_memory"))
        np.testing.assert_array_equal(a.view(np.uint8) if a.dtype == ml_dtypes.float8_e4m3fn else a,
                                      b.view(np.uint8) if b.dtype == ml_dtypes.float8_e4m3fn else b)
