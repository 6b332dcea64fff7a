"""AWQ checkpoints (AutoAWQ's 4-bit GEMM format, as in Qwen's `Qwen2.5-VL-*-AWQ` releases) export to graphs that
compute HF's model with the weights AutoAWQ itself dequantizes from the same tensors.

HF cannot load an AWQ checkpoint here (it needs gptqmodel's GPU kernels), so the reference is two independent
pieces: AutoAWQ's own `dequantize_gemm` (awq/utils/packing_utils.py from the autoawq 0.2.9 sdist, fetched by
scripts/setup.sh) turns each layer's qweight / qzeros / scales into its fp16 weight, and HF's model of the
unquantized checkpoint runs with those weights put in. fp32 graphs, so the fp32 tolerance applies.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_reference import assert_prefill_and_decode_match_hf, fp32_graphs, hf_model, prompt_with_pads
from qwen_vl_trt.export.quantized import weight_quantization
from qwen_vl_trt.model.errors import CheckpointError
from qwen_vl_trt.model.spec import ModelSpec
from tolerances import FP32_ATOL

GROUP = 16
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ WQLinear_GEMM.from_linear's order_map
PACKING_UTILS = Path(__file__).resolve().parents[1] / "third_party" / "autoawq" / "packing_utils.py"


def autoawq_packing_utils():
    spec = importlib.util.spec_from_file_location("autoawq_packing_utils", PACKING_UTILS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """int [A, B] in 0..15 -> int32 [A, B/8] as AutoAWQ's from_linear packs (nibble i = column order_map[i])."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int32)
    for col in range(values.shape[1] // 8):
        for i, c in enumerate(AWQ_PACK_ORDER):
            packed[:, col] |= values[:, col * 8 + c].to(torch.int32) << (4 * i)
    return packed


def awq_checkpoint(src: Path, dst: Path) -> dict:
    """Copy of the tiny Qwen2.5-VL with its text projections (in % GROUP == 0, out % 8 == 0) replaced by random
    AWQ tensors -> {HF weight name: the weight AutoAWQ's dequantize_gemm makes of them, [out, in] float32}."""
    utils = autoawq_packing_utils()
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(0)
    reference = {}
    for f in sorted(dst.glob("*.safetensors")):
        out = {}
        for key, w in load_file(f).items():
            projection = key.startswith("model.layers.") and key.endswith("_proj.weight")
            if not (projection and w.shape[1] % GROUP == 0 and w.shape[0] % 8 == 0):
                out[key] = w
                continue
            cols, rows = w.shape[1], w.shape[0]  # in, out
            q = torch.randint(0, 16, (cols, rows), generator=g)
            z = torch.randint(0, 16, (cols // GROUP, rows), generator=g)
            s = (torch.rand(cols // GROUP, rows, generator=g) * 0.02 + 0.001).half()
            layer = key[: -len(".weight")]
            out[f"{layer}.qweight"], out[f"{layer}.qzeros"], out[f"{layer}.scales"] = pack_awq(q), pack_awq(z), s
            ref = utils.dequantize_gemm(out[f"{layer}.qweight"], out[f"{layer}.qzeros"], s, 4, GROUP)  # [in, out]
            reference["model.language_model." + key[len("model."):]] = ref.t().float()
        save_file(out, f, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm",
                                  "zero_point": True, "modules_to_not_convert": ["visual"]}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    assert len(reference) >= 4 * 4  # q/k/v/o of every layer at least
    return reference


def test_awq_checkpoint_matches_hf_with_autoawq_weights(qwen2_5_vl_ckpt, tmp_path):
    ckpt = tmp_path / "awq"
    reference = awq_checkpoint(qwen2_5_vl_ckpt, ckpt)
    hf = hf_model(qwen2_5_vl_ckpt)
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, w in reference.items():
            params[name].copy_(w)
    spec = ModelSpec.from_checkpoint(ckpt)
    grid = torch.tensor([[1, 8, 8]])
    torch.manual_seed(1)
    worst = assert_prefill_and_decode_match_hf(hf, fp32_graphs(ckpt, tmp_path / "graphs"), spec,
                                               prompt_with_pads(spec, [16]), grid, torch.randn(64, 1176), steps=8,
                                               atol=FP32_ATOL)
    assert worst <= FP32_ATOL


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "awq", "bits": 8, "version": "gemm"}, "AWQ with bits=8"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version='gemv'"),
    ({"quant_method": "gptq", "bits": 4}, "quantization method 'gptq' is not supported"),
])
def test_unsupported_awq_variants_are_one_clear_error(config, message):
    with pytest.raises(CheckpointError, match=message):
        weight_quantization({"quantization_config": config}, "config.json")
