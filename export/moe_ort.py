"""decoder.ort.onnx: INT4 MoE experts as ONNX Runtime's `com.microsoft.QMoE` (its CPU kernel in 1.32, CUDA too).

decoder.onnx holds each MoE block's experts as one `qwen_vl::MoEExperts` node (export/moe.py) whose reference body
dequantizes every expert and runs the expert Loop. For INT4 experts this rewrites the node into QMoE, which reads
only the selected experts' 4-bit blocks:

| MoEExperts (decoder.onnx) | QMoE (decoder.ort.onnx) |
|---|---|
| x [N, C] | input [N, C] |
| ids / weights [A] from the router subgraph (softmax over E, TopK, renormalize) | router_probs = the router logits [N, E]; QMoE applies softmax, top-k and renormalization itself (`normalize_routing_weights=1`) |
| gate_up int4 [E, C, 2I] (gate columns, then up), scale [E, C/B, 2I] | fc1_experts_weights uint8 [E, 2I, C/2], rows interleaved gate_0, up_0, gate_1, up_1, ... (`swiglu_fusion=1`, the only layout the CPU kernel takes), values q + 8 (its default zero point 8), two per byte low nibble first; fc1_scales [E, 2I, C/B] |
| down int4 [E, I, C], scale [E, I/B, C] | fc2_experts_weights uint8 [E, C, I/2], fc2_scales [E, C, I/B] |
| silu(gate) * up | `activation_type=swiglu`, `activation_alpha=1`, `activation_beta=0`: gate * sigmoid(gate) * (up + 0), no limit |

Measured on ONNX Runtime 1.32 CPU, fp32, the tiny MoE block (8 experts, top-2, C 64, I 24, block 16, 37 tokens):
2.9e-6 max abs difference from HF's routing and activation on the same dequantized weights (outputs up to 10.8),
i.e. fp32 reordering; `accuracy_level=4` (int8 activations) gave 0.11, so the node keeps the default 0 (fp32
activations). Not rewritten (the node keeps its reference body): FP8 experts (ONNX Runtime 1.32 has no CPU QMoE
kernel for `quant_type=fp8`, and its FP8 form needs square blocks), and gate_up/down with different block sizes
(QMoE has one `block_size`). In a bf16 graph QMoE takes the softmax over the router logits in bf16 where HF takes it
in fp32: near-ties between the k-th and (k+1)-th expert may then select differently.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_graph import ExternalData
from .plugin_ops import DOMAIN

ORT_DOMAIN = "com.microsoft"


def to_qmoe(model: onnx.ModelProto, graph_dir: Path, data_path: Path) -> int:
    """In place: every top-level INT4 MoEExperts node of `model` -> one QMoE whose weights are appended to
    `data_path`; returns how many were rewritten. The router nodes and initializers left unread are the caller's to
    drop (export/ort_fused.py)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    todo = [n for n in g.node if n.domain == DOMAIN and n.op_type == "MoEExperts" and n.input[3] in inits
            and inits[n.input[3]].data_type == TensorProto.INT4]
    todo = [n for n in todo if _attrs(n)["gate_up_block_size"] == _attrs(n)["down_block_size"]]
    if not todo:
        return 0
    data = ExternalData(data_path, append=True)
    replaced = {}
    for node in todo:
        a = _attrs(node)
        block = a["gate_up_block_size"]
        q_gu, s_gu, q_dn, s_dn = (numpy_helper.to_array(inits[node.input[i]], base_dir=str(graph_dir))
                                  for i in (3, 4, 5, 6))
        i = q_dn.shape[1]
        order = np.stack([np.arange(i), i + np.arange(i)], axis=1).reshape(-1)  # gate_0, up_0, gate_1, ...
        tensors = {"fc1": _packed(q_gu[:, :, order]), "fc1_scales": _transposed(s_gu[:, :, order]),
                   "fc2": _packed(q_dn), "fc2_scales": _transposed(s_dn)}
        names = {}
        for role, arr in tensors.items():
            names[role] = f"{node.input[3 if role.startswith('fc1') else 5]}.qmoe.{role}"
            t = numpy_helper.from_array(arr, names[role])
            g.initializer.append(data.tensor(names[role], t.raw_data, t.data_type, t.dims))
        qmoe = helper.make_node(
            "QMoE", [node.input[0], _router_logits(node.input[1], producer), names["fc1"], names["fc1_scales"], "",
                     names["fc2"], names["fc2_scales"]], list(node.output), name=f"{node.name}/qmoe",
            domain=ORT_DOMAIN, k=a["top_k"], expert_weight_bits=4, block_size=block, activation_type="swiglu",
            swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=1)
        replaced[node.name] = qmoe
    data.close()
    nodes = [replaced.get(n.name, n) if n.domain == DOMAIN else n for n in g.node]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == ORT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
    return len(todo)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _packed(q: np.ndarray) -> np.ndarray:
    """int4 values [E, K, N] in [-8, 7] -> uint8 [E, N, K/2]: q + 8, two per byte along K, low nibble first."""
    u = (np.transpose(q, (0, 2, 1)).astype(np.int16) + 8).astype(np.uint8)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))


def _transposed(s: np.ndarray) -> np.ndarray:
    """scales [E, K/B, N] -> [E, N, K/B]."""
    return np.ascontiguousarray(np.transpose(s, (0, 2, 1)))


def _router_logits(ids: str, producer: dict) -> str:
    """The router logits [N, E] behind MoEExperts' ids input: Cast(int32) <- Reshape <- TopK <- Softmax <- [Cast] <-
    logits (export/moe.py `router`)."""
    node = producer[ids]
    while node.op_type in ("Cast", "Reshape"):
        node = producer[node.input[0]]
    if node.op_type != "TopK":
        raise ValueError(f"MoEExperts ids {ids!r} do not come from the router's TopK (found {node.op_type})")
    softmax = producer[node.input[0]]
    if softmax.op_type != "Softmax":
        raise ValueError(f"the router's TopK does not read a Softmax (found {softmax.op_type})")
    logits = softmax.input[0]
    if logits in producer and producer[logits].op_type == "Cast":  # bf16/fp16 graphs: softmax in fp32
        logits = producer[logits].input[0]
    return logits
