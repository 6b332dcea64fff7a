"""CPU CI for the plugin library: it compiles, exports only the two entry points, and TensorRT(-RTX) loads it,
sees the 4 creators, imports the qwen_vl nodes (fp16 and bf16) as PLUGIN_V3 layers and AOT-builds engines
for SM86/SM89/SM120. Without the library the same graphs import the reference function bodies and build.

What this cannot check: enqueue and kernel numerics (RTX compiles kernels on the GPU at load; the GPU harness
in tests/gpu/ covers them). The TensorRT part runs in a subprocess with rtx_env(), because the RTX parser
needs LD_LIBRARY_PATH (model/trt_compat.py says why) set before the process starts.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CREATORS = {"MRoPE": ["inv_freq", "axis"], "VarlenAttention": ["scale", "causal"], "KVCacheAttention": ["scale"],
            "MoEExperts": ["top_k", "gate_up_block_size", "down_block_size"]}
TARGETS = ("SM86", "SM89", "SM120")


@pytest.fixture(scope="module")
def plugin_lib() -> Path:
    from qwen_vl_trt.model.trt_compat import plugin_library_path

    r = subprocess.run(["bash", str(ROOT / "plugins" / "build.sh")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lib = plugin_library_path()
    assert lib.is_file(), lib
    return lib


@pytest.fixture(scope="module")
def trt_report(plugin_lib, tmp_path_factory) -> dict:
    from qwen_vl_trt.model.trt_compat import rtx_env

    out = tmp_path_factory.mktemp("trt") / "report.json"
    r = subprocess.run([sys.executable, __file__, str(plugin_lib), str(out)], capture_output=True, text=True,
                       env=rtx_env(), timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    report = json.loads(out.read_text())
    report["stderr"] = r.stderr
    return report


def test_library_exports_only_entry_points_and_links_no_tensorrt(plugin_lib):
    syms = subprocess.run(["nm", "-D", "--defined-only", str(plugin_lib)], capture_output=True, text=True).stdout
    exported = {line.split()[-1] for line in syms.splitlines() if line.split()[1:2] == ["T"]}
    assert exported == {"getCreators", "setLoggerFinder", "qwen_vl_set_attention_kernel"}
    dyn = subprocess.run(["readelf", "-d", str(plugin_lib)], capture_output=True, text=True).stdout
    needed = [line for line in dyn.splitlines() if "(NEEDED)" in line]
    assert needed and not any(n in line for line in needed for n in ("nvinfer", "tensorrt", "cudart"))
    sections = subprocess.run(["readelf", "-S", str(plugin_lib)], capture_output=True, text=True).stdout
    assert ".nv_fatbin" in sections  # device code is embedded (SASS for sm_80/86/89/90/120 + PTX)


def test_four_creators_with_declared_fields(trt_report):
    assert trt_report["creators"] == {name: {"namespace": "qwen_vl", "version": "1", "fields": fields,
                                             "interface": "PLUGIN CREATOR_V3ONE"}
                                      for name, fields in CREATORS.items()}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_plugin_nodes_parse_as_plugin_v3_and_build_aot(trt_report, graph, dtype):
    res = trt_report["plugin"][f"{graph}-{dtype}"]
    expected = {"vision": ["MRoPE", "MRoPE", "VarlenAttention"], "decoder": ["KVCacheAttention", "MRoPE", "MRoPE"]}
    assert res["plugin_layers"] == expected[graph]
    assert res["non_plugin_layers"] == []
    assert res["magic"] == "vtrt"  # TensorRT-RTX engine
    assert res["names_in_engine"] == sorted(set(expected[graph]) | {"qwen_vl"})


def test_bad_table_is_rejected_at_build_time_with_our_message(trt_report):
    # MRoPE with a D/2 = 16 table on D = 64 input: configurePlugin refuses and says why through the logger
    # TensorRT handed to setLoggerFinder (the process's first logger, hence stderr rather than `errors`).
    assert trt_report["bad_mrope"]["built"] is False
    assert any("configurePlugin" in m for m in trt_report["bad_mrope"]["errors"])
    assert "MRoPE: last dim of x must be 2 * len(inv_freq)" in trt_report["stderr"]


@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_without_library_the_function_bodies_parse_and_build(trt_report, graph):
    res = trt_report["reference"][graph]
    assert res["plugin_layers"] == [] and res["n_layers"] > 10
    assert res["magic"] == "vtrt"


# ---- the TensorRT part (runs as a script in a subprocess with rtx_env()) --------------------------------
def _models(dtype: str):
    import numpy as np
    from onnx import TensorProto, helper

    from qwen_vl_trt.export import plugin_ops as po

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[dtype]
    vi = helper.make_tensor_value_info
    fv, fd = po.rotary_tables_vision(64)
    vision = helper.make_graph(
        [po.make_mrope_node("q", "pos", "qr", fv, fd, name="/vision/blocks.0/attn/q_rope"),
         po.make_mrope_node("k", "pos", "kr", fv, fd, name="/vision/blocks.0/attn/k_rope"),
         po.make_varlen_attention_node("qr", "kr", "v", "cu_seqlens", "o", 64 ** -0.5,
                                       name="/vision/blocks.0/attn/VarlenAttention")],
        "vision", [vi("q", elem, ["T", 4, 64]), vi("k", elem, ["T", 2, 64]), vi("v", elem, ["T", 2, 64]),
                   vi("pos", TensorProto.INT32, ["T", 2]), vi("cu_seqlens", TensorProto.INT32, ["F1"])],
        [vi("o", elem, ["T", 4, 64])])
    ft, ta = po.mrope_tables_text(32, 5e6, [6, 5, 5], interleaved=True)
    decoder = helper.make_graph(
        [po.make_mrope_node("q", "pos", "qr", ft, ta, name="/text/layers.0/self_attn/q_rope"),
         po.make_mrope_node("k", "pos", "kr", ft, ta, name="/text/layers.0/self_attn/k_rope"),
         po.make_kv_cache_attention_node("qr", "kr", "v", "past_key.0", "past_value.0", "past_lengths", "o",
                                         "present_key.0", "present_value.0", 32 ** -0.5,
                                         name="/text/layers.0/self_attn/KVCacheAttention")],
        "decoder", [vi("q", elem, ["B", "S", 4, 32]), vi("k", elem, ["B", "S", 2, 32]), vi("v", elem, ["B", "S", 2, 32]),
                    vi("past_key.0", elem, ["B", 2, "C", 32]), vi("past_value.0", elem, ["B", 2, "C", 32]),
                    vi("past_lengths", TensorProto.INT32, ["B"]), vi("pos", TensorProto.INT32, ["B", "S", 3])],
        [vi("o", elem, ["B", "S", 4, 32]), vi("present_key.0", elem, ["B", 2, "C", 32]),
         vi("present_value.0", elem, ["B", 2, "C", 32])])
    profiles = {"vision": {"q": ("T", 4, 64), "k": ("T", 2, 64), "v": ("T", 2, 64), "pos": ("T", 2),
                           "cu_seqlens": ("F1",)},
                "decoder": {"q": ("B", "S", 4, 32), "k": ("B", "S", 2, 32), "v": ("B", "S", 2, 32),
                            "past_key.0": ("B", 2, "C", 32), "past_value.0": ("B", 2, "C", 32),
                            "past_lengths": ("B",), "pos": ("B", "S", 3)}}
    out = {}
    for g in (vision, decoder):
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", po.OPSET)])
        model.ir_version = 10
        out[g.name] = (po.add_functions(model).SerializeToString(), profiles[g.name])
    del np
    return out


RANGES = {"T": (1, 256, 1024), "F1": (2, 5, 33), "B": (1, 2, 2), "S": (1, 16, 64), "C": (64, 128, 256)}


def _parse_and_build(trt, logger, onnx_bytes, profile, targets=TARGETS) -> dict:
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    plugin_names = [l.name for l in layers if l.type == trt.LayerType.PLUGIN_V3]
    cfg = builder.create_builder_config()
    # KVCacheAttention's present_* alias past_* (getAliasedInput): TensorRT requires this preview feature.
    cfg.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    prof = builder.create_optimization_profile()
    for name, dims in profile.items():
        shapes = [tuple(RANGES[d][i] if isinstance(d, str) else d for d in dims) for i in range(3)]
        prof.set_shape(name, *shapes)
    cfg.add_optimization_profile(prof)
    cfg.num_compute_capabilities = len(targets)
    for i, t in enumerate(targets):
        cfg.set_compute_capability(getattr(trt.ComputeCapability, t), i)
    blob = builder.build_serialized_network(network, cfg)
    if blob is None:
        raise RuntimeError("engine build failed (see the TensorRT log)")
    data = bytes(blob)
    plugin_ops = [l.name.rsplit("/", 1)[-1] for l in layers if l.type == trt.LayerType.PLUGIN_V3]
    return {"plugin_layer_names": plugin_names, "n_layers": len(layers), "magic": data[:4].decode("latin1"),
            "plugin_layers": sorted({"q_rope": "MRoPE", "k_rope": "MRoPE"}.get(n, n) for n in plugin_ops),
            "non_plugin_layers": [l.name for l in layers if l.type != trt.LayerType.PLUGIN_V3],
            "names_in_engine": sorted(n for n in ["MRoPE", "VarlenAttention", "KVCacheAttention", "qwen_vl"]
                                      if n.encode() in data)}


def _bad_mrope(trt, lib) -> dict:
    from onnx import TensorProto, helper

    from qwen_vl_trt.export import plugin_ops as po

    class Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)

    f, a = po.rotary_tables_vision(32)
    vi = helper.make_tensor_value_info
    g = helper.make_graph([po.make_mrope_node("x", "pos", "y", f, a)], "bad",
                          [vi("x", TensorProto.FLOAT16, ["T", 2, 64]), vi("pos", TensorProto.INT32, ["T", 2])],
                          [vi("y", TensorProto.FLOAT16, ["T", 2, 64])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", po.OPSET)])
    model.ir_version = 10
    logger = Capture()
    try:
        _parse_and_build(trt, logger, po.add_functions(model).SerializeToString(),
                         {"x": ("T", 2, 64), "pos": ("T", 2)})
        built = True
    except RuntimeError:
        built = False
    return {"built": built, "errors": logger.errors}


def _main(lib: str, out: str) -> None:
    from qwen_vl_trt.model.trt_compat import import_tensorrt, load_plugin_library

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.ERROR)  # the inlined bodies repeat node names: harmless warnings
    report = {"reference": {}, "plugin": {}}
    for name, (onnx_bytes, profile) in _models("float16").items():  # before the library is loaded
        report["reference"][name] = _parse_and_build(trt, logger, onnx_bytes, profile, targets=("SM86",))
    load_plugin_library(lib, trt=trt)
    report["creators"] = {
        c.name: {"namespace": c.plugin_namespace, "version": c.plugin_version,
                 "fields": [f.name for f in c.field_names], "interface": c.interface_info.kind}
        for c in trt.get_plugin_registry().all_creators if c.plugin_namespace == "qwen_vl"}
    for dtype in ("float16", "bfloat16"):
        for name, (onnx_bytes, profile) in _models(dtype).items():
            report["plugin"][f"{name}-{dtype}"] = _parse_and_build(trt, logger, onnx_bytes, profile)
    report["bad_mrope"] = _bad_mrope(trt, lib)
    Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    _main(*sys.argv[1:3])
