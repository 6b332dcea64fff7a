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
from hf_reference import run
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.export.spec import ModelSpec
from tolerances import BF16_LOGITS_ATOL


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def bf16_graphs(qwen3_vl_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    export_graphs(qwen3_vl_ckpt, out, "bf16", graphs=("embed", "decoder"))
    for name in ("embed", "decoder"):  # the files hold bf16 weights and bf16 I/O
        m = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        assert m.graph.output[0].type.tensor_type.elem_type in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT)
        assert any(i.data_type == onnx.TensorProto.BFLOAT16 for i in m.graph.initializer)
    return out


def test_bf16_greedy_16_steps_match_hf(qwen3_vl_ckpt, bf16_graphs):
    import transformers

    spec = ModelSpec.from_checkpoint(qwen3_vl_ckpt)
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(qwen3_vl_ckpt, dtype=torch.bfloat16).eval()
    emb, dec = (_session(load_emulated(bf16_graphs / f"{n}.onnx")) for n in ("embed", "decoder"))
    t, c = spec.text, spec.text.hidden_size
    ids = torch.arange(1000, 1012)[None]
    cache_shape = (1, t.num_key_value_heads, 64, t.head_dim)
    caches = {f"past_{kv}.{i}": np.zeros(cache_shape, np.float32)
              for i in range(t.num_hidden_layers) for kv in ("key", "value")}
    empty = {"vision_features": np.zeros((0, c), np.float32), "deepstack_features": np.zeros((3, 0, c), np.float32)}
    hf_cache, pos, tokens, ours = None, 0, ids, []
    worst = 0.0
    for step in range(17):  # prefill + 16 decode steps, both sides fed the same (HF's) tokens
        n = tokens.shape[1]
        with torch.no_grad():
            ref = hf(input_ids=tokens, past_key_values=hf_cache, use_cache=True,
                     position_ids=torch.arange(pos, pos + n).expand(3, 1, -1))
        hf_cache = ref.past_key_values
        e = run(emb, {"input_ids": tokens.numpy(), **empty})
        out = run(dec, {"inputs_embeds": e["inputs_embeds"], "deepstack_embeds": e["deepstack_embeds"],
                        "position_ids": np.arange(pos, pos + n)[None, None].repeat(3, 0),
                        "past_lengths": np.array([pos]), "logits_index": np.array([n - 1]), **caches})
        caches = {k.replace("present", "past"): v for k, v in out.items() if k.startswith("present")}
        ref_logits = ref.logits[0, -1].float().numpy()
        worst = max(worst, float(np.abs(out["logits"][0] - ref_logits).max()))
        assert int(out["logits"][0].argmax()) == int(ref_logits.argmax()), f"greedy token differs at step {step}"
        pos += n
        tokens = torch.tensor([[int(ref_logits.argmax())]])
    print(f"bf16 worst |logits diff| over 17 steps: {worst:.4f}")
    assert worst <= BF16_LOGITS_ATOL, worst
