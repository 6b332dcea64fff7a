"""`--weights fp8`: FP8 e4m3 blocks inside the graphs (export/fp8.py).

From a Qwen-format FP8 checkpoint (written here by tests/test_fp8_checkpoints.py's helper, 16x16 blocks so the tiny
models have several), the graphs hold the checkpoint's own e4m3 bytes and scales: the reference is HF transformers
loading the same checkpoint (it dequantizes `q.float() * scale_inv` on a CPU machine), and since DequantizeLinear
computes that same fp32 product, the fp32 tolerance applies. From a dense checkpoint, FP8 is round-to-nearest per
block of 128 along K: the reference is HF with each weight replaced by its e4m3 value computed here from the
definition (scale = amax / 448 per block of each output row), so again the fp32 tolerance; the dense model is far
from both, so the tests fail if nothing was quantized.
"""
from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from hf_reference import (assert_prefill_and_decode_match_hf, graphs_prefill, hf_model, mm_token_type_ids,
                          prompt_with_pads)
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.export.weights import canonical_key
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.weight_formats import WeightFormats
from test_fp8_checkpoints import GRID, PATCH_DIM, _fp8_checkpoint
from tolerances import FP32_ATOL

FP8 = WeightFormats.parse("fp8")
DECODERS = ("decoder.onnx", "decoder.ort.onnx")


def _inputs(spec, family):
    grid = torch.tensor(GRID[family])
    torch.manual_seed(1)
    pixels = torch.randn(int(grid.prod()), PATCH_DIM[family])
    return prompt_with_pads(spec, [int(grid.prod()) // 4]), grid, pixels


def _initializers(path: Path) -> dict:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}  # external data read from path's folder


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_fp8_checkpoint_bytes_kept_and_graphs_match_hf(family, request, tmp_path):
    ckpt = _fp8_checkpoint(request.getfixturevalue(f"{family}_ckpt"), tmp_path / "fp8")
    out = tmp_path / "graphs"
    export_graphs(ckpt, out, "fp32", formats=FP8)
    stored = load_file(ckpt / "model.safetensors")
    inits = _initializers(out / "decoder.onnx")
    fp8_inits = {n for n, t in inits.items() if t.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    expected = set()
    for key, q in stored.items():
        name = canonical_key(key)  # Qwen2.5-VL stores model.layers.*: model.language_model.layers.* in memory
        if q.dtype != torch.float8_e4m3fn or "language_model" not in name:
            continue
        expected.add(f"{name}_t.fp8")
        t = inits[f"{name}_t.fp8"]
        assert list(t.dims) == [q.shape[1], q.shape[0]]  # [K, N]
        assert t.raw_data == q.t().contiguous().view(torch.uint8).numpy().tobytes()  # the checkpoint's bytes
        s = onnx.numpy_helper.to_array(inits[f"{name}_t.scale"])  # [K/16, N] fp32
        scale_inv = stored[f"{key}_scale_inv"].float().numpy()  # [N/16, K/16]
        want = np.array([[scale_inv[n // 16, b] for n in range(q.shape[0])] for b in range(s.shape[0])], np.float32)
        np.testing.assert_array_equal(s, want)
    assert expected and fp8_inits == expected  # every FP8 decoder weight, nothing else (vision stays dense)
    # down_proj (K = 37, not a whole number of 16-blocks) is dense in the checkpoint, so it stays dense
    down = [n for n in inits if n.endswith("down_proj.weight_t")]
    assert down and all(inits[n].data_type == onnx.TensorProto.FLOAT for n in down)

    spec, hf = ModelSpec.from_checkpoint(ckpt), hf_model(ckpt)
    for decoder in DECODERS:
        worst = assert_prefill_and_decode_match_hf(hf, out, spec, *_inputs(spec, family), steps=8, atol=FP32_ATOL,
                                                   decoder=decoder)
        assert worst <= FP32_ATOL


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_fp8_artifacts_generate_hf_greedy_tokens(family, request, tmp_path):
    """export_all --weights fp8 on an FP8 checkpoint, through the runtime: greedy tokens == HF generate on the same
    checkpoint; manifest.json records the formats."""
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    ckpt = _fp8_checkpoint(request.getfixturevalue(f"{family}_ckpt"), tmp_path / "fp8")
    art = export_all(ckpt, tmp_path / "art", "fp32", formats=FP8).parent
    model = load_model(art, "onnxruntime")
    assert model.manifest.weight_formats() == FP8
    req = Preprocessor(model.manifest).prepare(Request("Explain quantization."))
    ours = generate(model, [req], Sampler(SamplingConfig(temperature=0)), 16, ignore_eos=True)[0].token_ids
    with torch.no_grad():
        ids = torch.tensor([req.input_ids])
        ref = hf_model(ckpt).generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                                      output_scores=True, return_dict_in_generate=True)
    # well posed: HF's top-2 logits are apart by 10x the fp32 tolerance (which the logits meet, test above) at
    # every step; random tiny models have near-ties for some prompts, where summation order picks either token
    assert min(float(s[0].topk(2).values.diff().abs()) for s in ref.scores) > 10 * FP32_ATOL
    assert ours == ref.sequences[0, ids.shape[1]:].tolist()


def rtn_fp8(weight: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The e4m3 value of an HF Linear weight [out, in]: per output row, blocks of `block` input features (the last
    may be partial), scale = amax / 448, q = nearest e4m3 (ml_dtypes) of w / scale; returns q * scale."""
    w = weight.detach().float().numpy()
    out = np.empty_like(w)
    for start in range(0, w.shape[1], block):
        chunk = w[:, start:start + block]
        scale = np.abs(chunk).max(axis=1, keepdims=True) / np.float32(448)
        scale[scale == 0] = 1
        q = np.clip(chunk / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        out[:, start:start + block] = q * scale
    return torch.from_numpy(out)


def hf_with_fp8_weights(ckpt, lm_head: bool):
    hf = hf_model(ckpt)
    n = 0
    with torch.no_grad():
        for name, module in hf.model.language_model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1].endswith("_proj"):
                module.weight.copy_(rtn_fp8(module.weight))
                n += 1
        if lm_head:  # a new Parameter: with tied embeddings the embedding table itself stays dense
            hf.lm_head.weight = torch.nn.Parameter(rtn_fp8(hf.lm_head.weight))
    assert n >= 4 * 7
    return hf


@pytest.mark.parametrize("family,tied", [("qwen3_vl", False), ("qwen3_vl", True), ("qwen2_5_vl", False)])
def test_fp8_from_dense_checkpoint_is_rtn_per_block(family, tied, request, tmp_path):
    ckpt = request.getfixturevalue(f"{family}_tied_ckpt" if tied else f"{family}_ckpt")
    formats = WeightFormats.parse("fp8,lm_head=fp8")
    export_graphs(ckpt, tmp_path, "fp32", formats=formats)
    spec = ModelSpec.from_checkpoint(ckpt)
    hf = hf_with_fp8_weights(ckpt, lm_head=True)
    for decoder in DECODERS:
        assert_prefill_and_decode_match_hf(hf, tmp_path, spec, *_inputs(spec, family), steps=4, atol=FP32_ATOL,
                                           decoder=decoder)
    ours, _ = graphs_prefill(tmp_path, spec, hf, *_inputs(spec, family))
    dense = hf_model(ckpt)
    ids, grid, pixels = _inputs(spec, family)
    with torch.no_grad():
        tt = mm_token_type_ids(ids, spec.image_token_id, spec.video_token_id)
        ref = dense(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=tt).logits[0, -1]
    assert np.abs(ours["logits"][0] - ref.numpy()).max() > 100 * FP32_ATOL  # the graphs hold e4m3 values


class _StoredFp8:
    """The part of CheckpointWeights that export/fp8.py reads, for one stored FP8 weight."""

    def __init__(self, q, scale, quant):
        self.q, self.scale, self.quant = q, scale, quant

    def get_fp8(self, key):
        return (self.q, *self.quant.block_grid(self.q, self.scale, key))


@pytest.mark.parametrize("method,block,scale_shape,bm_bn", [
    ("fp8", (16, 16), (2, 3), (16, 16)),   # 2-D blocks with partial last row and column of blocks ([20, 36])
    ("fp8", None, (2, 3), (10, 12)),       # no weight_block_size: the block is ceil(shape / grid)
    ("compressed-tensors", None, (20, 1), (1, 36)),  # per output channel
    ("compressed-tensors", None, (), (20, 36)),      # per tensor
])
def test_fp8_graph_weight_is_the_definition(method, block, scale_shape, bm_bn, tmp_path):
    """One MatMul whose weight is fp8_matmul_weight of a stored [20, 36] e4m3 weight, run by ONNX Runtime: its
    [K, N] = [36, 20] value is W^T with W[i, j] = q[i, j] * scale[i // bm, j // bn], the definition by loops."""
    import onnxruntime as ort

    from qwen_vl_trt.export.fp8 import fp8_matmul_weight
    from qwen_vl_trt.export.onnx_graph import GraphBuilder
    from qwen_vl_trt.export.quantized import Fp8Weights

    g = torch.Generator().manual_seed(0)
    q = (torch.randn(20, 36, generator=g) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(scale_shape, generator=g) + 0.5
    quant = Fp8Weights(method, "_scale_inv" if method == "fp8" else "_scale", block)
    b = GraphBuilder("t", None, "float32")
    x = b.input("x", "float32", [36, 36])
    b.output(b.op("MatMul", [x, fp8_matmul_weight(b, _StoredFp8(q, scale, quant), "w.weight", "w_t")]),
             "y", "float32", [36, 20])
    b.finish(tmp_path / "t.onnx")
    got = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.eye(36, dtype=np.float32)})[0]  # identity input: y = the weight value [K, N]
    qf, s = q.float().numpy(), scale.numpy().reshape(scale_shape or (1, 1))
    bm, bn = bm_bn
    want = np.array([[qf[i, j] * s[i // bm, j // bn] for j in range(36)] for i in range(20)], np.float32)
    np.testing.assert_array_equal(got, want.T)
