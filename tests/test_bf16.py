"""bf16 export vs HF bf16: stated tolerance on logits and the same greedy tokens over 16 steps.

ORT CPU has no bf16 kernels, so the bf16 graphs run through bf16_emulation (every bf16 value rounded to
bf16 after the op that makes it). The graphs checked are the bf16 files `--dtype bf16` writes.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bf16_emulation import load_emulated
from hf_reference import hf_model, run, text_embed_feeds
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.model.spec import ModelSpec
from tolerances import BF16_LOGITS_ATOL


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl"])
def family(request, tmp_path_factory):
    """(checkpoint, bf16 embed + decoder graphs) of each family (the MoE decoder with its experts Loop)."""
    ckpt = request.getfixturevalue(f"{request.param}_ckpt")
    return ckpt, bf16_graphs(ckpt, tmp_path_factory.mktemp(f"{request.param}_bf16"))


def bf16_graphs(ckpt, out):
    export_graphs(ckpt, out, "bf16", graphs=("embed", "decoder"))
    for name in ("embed", "decoder"):  # the files hold bf16 weights and bf16 I/O
        m = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        assert m.graph.output[0].type.tensor_type.elem_type in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT)
        assert any(i.data_type == onnx.TensorProto.BFLOAT16 for i in m.graph.initializer)
    return out


def test_bf16_greedy_16_steps_match_hf(family):
    ckpt, graphs = family
    spec = ModelSpec.from_checkpoint(ckpt)
    hf = hf_model(ckpt, "bfloat16")
    emb, dec = (_session(load_emulated(graphs / f"{n}.onnx")) for n in ("embed", "decoder"))
    t = spec.text
    ids = torch.arange(1000, 1012)[None]
    cache_shape = (1, t.num_key_value_heads, 64, t.head_dim)
    caches = {f"past_{kv}.{i}": np.zeros(cache_shape, np.float32)
              for i in range(t.num_hidden_layers) for kv in ("key", "value")}
    hf_cache, pos, tokens, ours = None, 0, ids, []
    worst = 0.0
    for step in range(17):  # prefill + 16 decode steps, both sides fed the same (HF's) tokens
        n = tokens.shape[1]
        with torch.no_grad():
            ref = hf(input_ids=tokens, past_key_values=hf_cache, use_cache=True,
                     position_ids=torch.arange(pos, pos + n).expand(3, 1, -1))
        hf_cache = ref.past_key_values
        e = run(emb, text_embed_feeds(spec, tokens.numpy()))  # inputs_embeds (+ deepstack_embeds)
        out = run(dec, {**e, "position_ids": np.arange(pos, pos + n)[None, None].repeat(3, 0),
                        "past_lengths": np.array([pos]), "logits_index": np.array([n - 1]), **caches})
        caches = {k.replace("present", "past"): v for k, v in out.items() if k.startswith("present")}
        ref_logits = ref.logits[0, -1].float().numpy()
        worst = max(worst, float(np.abs(out["logits"][0] - ref_logits).max()))
        assert int(out["logits"][0].argmax()) == int(ref_logits.argmax()), f"greedy token differs at step {step}"
        pos += n
        tokens = torch.tensor([[int(ref_logits.argmax())]])
    print(f"bf16 worst |logits diff| over 17 steps: {worst:.4f}")
    assert worst <= BF16_LOGITS_ATOL, worst
