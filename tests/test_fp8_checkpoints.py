"""FP8 checkpoints (Qwen's official `*-FP8` block-wise format and llm-compressor's compressed-tensors FP8) export
to graphs that match HF transformers loading the same files.

The checkpoints are the tiny test checkpoints with their linear weights quantized here, in the layouts those tools
write. HF is the reference: on a CPU machine it dequantizes the FP8 block-wise format at load
(`FineGrainedFP8Config`, "default to dequantizing") and decompresses compressed-tensors weights on the forward
pass; our export dequantizes as it reads (export/quantized.py). Both compute in fp32 afterwards, so the fp32
tolerance applies. HF cannot read fused FP8 experts of Qwen3-VL-MoE (it drops their scales as unexpected keys),
so for the MoE the reference checkpoint holds the experts dequantized by HF's own `Fp8Dequantize`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_reference import assert_prefill_and_decode_match_hf, fp32_graphs, hf_model, prompt_with_pads
from qwen_vl_trt.export.quantized import Fp8Weights, weight_quantization
from qwen_vl_trt.model.errors import CheckpointError
from qwen_vl_trt.model.spec import ModelSpec
from tolerances import FP32_ATOL

E4M3_MAX = 448.0
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
PATCH_DIM = {"qwen3_vl": 3 * 2 * 16 * 16, "qwen3_vl_moe": 3 * 2 * 16 * 16, "qwen2_5_vl": 3 * 2 * 14 * 14}
GRID = {"qwen3_vl": [[1, 14, 10]], "qwen3_vl_moe": [[1, 14, 10]], "qwen2_5_vl": [[1, 8, 8]]}


def _is_linear(key: str, t: torch.Tensor) -> bool:
    return (t.ndim in (2, 3) and key.endswith(("_proj.weight", "qkv.weight", "proj.weight", "gate_up_proj", "down_proj"))
            and "embed" not in key and "lm_head" not in key)


def _quantize_blocks(t: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantization as Qwen's FP8 releases store it: (q [.., R, C], scale_inv [.., R/b, C/b])."""
    r, c = t.shape[-2:]
    blocks = t.float().reshape(*t.shape[:-2], r // block, block, c // block, block)
    scale = (blocks.abs().amax(dim=(-3, -1)) / E4M3_MAX).clamp(min=1e-12)
    q = (blocks / scale[..., :, None, :, None]).to(torch.float8_e4m3fn).reshape(t.shape)
    return q, scale


def _fp8_checkpoint(src, dst, block: int = 16, experts_dequantized_by_hf: bool = False):
    """Copy of `src` with every linear whose dims divide `block` stored as FP8 + `<key>_scale_inv` (fused MoE experts
    [E, R, C] get [E, R/b, C/b] grids). With `experts_dequantized_by_hf`, experts are instead written as HF's
    `Fp8Dequantize` turns those FP8 tensors into float32 (the reference for a checkpoint HF cannot read)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    shutil.copytree(src, dst)
    n_quantized = 0
    for f in sorted(dst.glob("*.safetensors")):
        out = {}
        for k, t in load_file(f).items():
            if not (_is_linear(k, t) and t.shape[-1] % block == 0 and t.shape[-2] % block == 0):
                out[k] = t
                continue
            q, scale = _quantize_blocks(t, block)
            n_quantized += 1
            if experts_dequantized_by_hf and ".experts." in k:
                out[k] = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.float32)
            else:
                out[k], out[k + "_scale_inv"] = q, scale
        save_file(out, f, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = dict(FP8_CONFIG, weight_block_size=[block, block])
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    assert n_quantized >= 8, "too few weights quantized for the test to mean anything"
    return dst


def _assert_matches_hf(ckpt, graphs, hf, family: str):
    spec = ModelSpec.from_checkpoint(ckpt)
    grid = torch.tensor(GRID[family])
    torch.manual_seed(1)
    pixels = torch.randn(int(grid.prod()), PATCH_DIM[family])
    worst = assert_prefill_and_decode_match_hf(hf, graphs, spec, prompt_with_pads(spec, [int(grid.prod()) // 4]),
                                               grid, pixels, steps=8, atol=FP32_ATOL)
    assert worst <= FP32_ATOL


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_fp8_block_checkpoint_matches_hf(family, request, tmp_path):
    ckpt = _fp8_checkpoint(request.getfixturevalue(f"{family}_ckpt"), tmp_path / "fp8")
    hf = hf_model(ckpt)  # HF dequantizes at load on a machine without FP8 kernels
    scaled = dict(hf.named_parameters())
    q_key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert scaled[q_key].dtype == torch.float32 and scaled[q_key].abs().max() < 100  # scaled, not a raw e4m3 cast
    _assert_matches_hf(ckpt, fp32_graphs(ckpt, tmp_path / "graphs"), hf, family)


def test_fp8_moe_fused_experts_match_hf_dequantization(qwen3_vl_moe_ckpt, tmp_path):
    ckpt = _fp8_checkpoint(qwen3_vl_moe_ckpt, tmp_path / "fp8")
    reference = _fp8_checkpoint(qwen3_vl_moe_ckpt, tmp_path / "ref", experts_dequantized_by_hf=True)
    assert any(k.endswith("experts.gate_up_proj_scale_inv") for k in load_file(ckpt / "model.safetensors"))
    _assert_matches_hf(ckpt, fp32_graphs(ckpt, tmp_path / "graphs"), hf_model(reference), "qwen3_vl_moe")


def test_compressed_tensors_fp8_channel_checkpoint_matches_hf(qwen3_vl_ckpt, tmp_path):
    """llm-compressor layout: per-output-channel `weight_scale` [R, 1] in bf16, text linears only (vision ignored).
    HF needs the compressed-tensors package, which decompresses the weights on the forward pass."""
    ckpt = shutil.copytree(qwen3_vl_ckpt, tmp_path / "ct")
    f = ckpt / "model.safetensors"
    out = {}
    for k, t in load_file(f).items():
        if k.startswith("model.language_model.layers.") and k.endswith("_proj.weight"):
            scale = (t.float().abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12).to(torch.bfloat16)
            out[k], out[k + "_scale"] = (t.float() / scale.float()).to(torch.float8_e4m3fn), scale
        else:
            out[k] = t
    save_file(out, f, metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["re:.*language_model.layers.*_proj$"], "input_activations": None,
                                      "output_activations": None,
                                      "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                  "strategy": "channel", "dynamic": False}}},
        "ignore": ["lm_head"], "kv_cache_scheme": None}
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    _assert_matches_hf(ckpt, fp32_graphs(ckpt, tmp_path / "graphs"), hf_model(ckpt), "qwen3_vl")


def test_partial_edge_blocks_scale_their_own_rows_and_columns():
    """A [20, 36] weight in 16x16 blocks has a 2x3 grid whose last row/column of blocks are partial (as vLLM reads
    Qwen3-VL-8B's 4304-wide vision MLP). Reference: the definition W[i, j] = q[i, j] * s[i // 16, j // 16], by loops."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(20, 36, generator=g) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, generator=g) + 0.5
    got = Fp8Weights("fp8", "_scale_inv", (16, 16)).dequantize(q, s, "w").numpy()
    qf, sf = q.float().numpy(), s.numpy()
    want = np.array([[qf[i, j] * sf[i // 16, j // 16] for j in range(36)] for i in range(20)], np.float32)
    np.testing.assert_array_equal(got, want)


def test_per_tensor_and_per_channel_scales():
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(3, 4, 8, generator=g) * 50).to(torch.float8_e4m3fn)  # three stacked experts
    per_tensor = Fp8Weights("fp8", "_scale_inv", None).dequantize(q, torch.tensor(0.25), "w")
    np.testing.assert_array_equal(per_tensor.numpy(), q.float().numpy() * np.float32(0.25))
    s = torch.rand(4, 1, generator=g)
    per_channel = Fp8Weights("compressed-tensors", "_scale", None).dequantize(q[0], s, "w")
    np.testing.assert_array_equal(per_channel.numpy(), q[0].float().numpy() * s.numpy())


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quantization method 'bitsandbytes' is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "FP8 format 'e5m2' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"},
     "compressed-tensors format 'pack-quantized' is not supported"),
])
def test_unsupported_quantization_is_one_clear_error(config, message):
    with pytest.raises(CheckpointError, match=message):
        weight_quantization({"quantization_config": config}, "config.json")


def test_fp8_weight_without_scale_fails_the_export_cleanly(qwen3_vl_ckpt, tmp_path):
    ckpt = _fp8_checkpoint(qwen3_vl_ckpt, tmp_path / "fp8")
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    victim = "model.language_model.layers.1.self_attn.o_proj.weight_scale_inv"
    del tensors[victim]
    save_file(tensors, f, metadata={"format": "pt"})
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.cli", str(ckpt), str(tmp_path / "out"),
                        "--dtype", "fp32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {ckpt}: weight {victim[:-len('_scale_inv')]!r} is stored as F8_E4M3 without a scale "
        f"({victim})"]
