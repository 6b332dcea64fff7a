"""The exported ONNX files, the GraphSpec contracts, the module docstring tables and docs/graphs.md agree,
for each family (Qwen3-VL and Qwen3-VL-MoE: the same contracts; Qwen2.5-VL with its own vision module and no
DeepStack tensors)."""
from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from qwen_vl_trt.export import decoder, embed, vision, vision_qwen2_5
from qwen_vl_trt.model.contracts import CONTRACTS
from qwen_vl_trt.export.onnx_graph import ELEM
from qwen_vl_trt.model.spec import ModelSpec

DOCS = Path(__file__).resolve().parents[1] / "docs" / "graphs.md"
MODULES = {"vision": vision, "embed": embed, "decoder": decoder}
FAMILY_MODULES = {"qwen3_vl": MODULES, "qwen3_vl_moe": MODULES, "qwen2_5_vl": {**MODULES, "vision": vision_qwen2_5}}
GRAPHS = [(family, graph) for family in FAMILY_MODULES for graph in MODULES]


def _dims(value_info):
    return tuple(d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim)


@pytest.mark.parametrize("family,graph", GRAPHS)
def test_onnx_io_equals_contract(family, graph, request):
    spec = ModelSpec.from_checkpoint(request.getfixturevalue(f"{family}_ckpt"))
    contract = CONTRACTS[graph](spec).resolve("float32")
    graphs = request.getfixturevalue(f"{family}_fp32_graphs")
    files = [f"{graph}.onnx"] + ([f"{graph}.ort.onnx"] if graph != "embed" else [])  # ONNX Runtime's flavour too
    for name in files:
        model = onnx.load(str(graphs / name), load_external_data=False)
        for kind, got, want in (("input", model.graph.input, contract.inputs),
                                ("output", model.graph.output, contract.outputs)):
            assert [v.name for v in got] == [t.name for t in want], (name, kind)
            for v, t in zip(got, want):
                assert v.type.tensor_type.elem_type == ELEM[t.dtype], (name, t.name)
                assert _dims(v) == tuple(t.dims), (name, t.name)


@pytest.mark.parametrize("family,graph", GRAPHS)
def test_docstring_and_docs_tables_name_every_tensor(family, graph, request):
    spec = ModelSpec.from_checkpoint(request.getfixturevalue(f"{family}_ckpt"))
    contract = CONTRACTS[graph](spec)
    doc, page = FAMILY_MODULES[family][graph].__doc__, DOCS.read_text()
    for t in contract.inputs + contract.outputs:
        name = re.sub(r"\.\d+$", ".{i}", t.name)
        row = re.search(rf"^\| (in|out) \| `{re.escape(name)}` \| (\S+) \|", doc, re.M)
        assert row, f"{graph}.py docstring lacks `{name}`"
        assert row.group(2) == t.dtype, f"{name}: docstring says {row.group(2)}, contract {t.dtype}"
        assert f"`{name}`" in page, f"docs/graphs.md lacks `{name}`"
