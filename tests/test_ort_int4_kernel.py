"""qwen_vl::MatMulInt4, our ONNX Runtime custom op for INT4 products with fp32 activations on the CPU
(plugins/ortMatMulInt4/, runtime/backends/ort_int4_kernel.py).

References: the contrib op's definition computed in float64 numpy from ONNX Runtime's documented MatMulNBits layout
(B [N, K/block, block/2] with the low nibble first, scales [N, K/block], zero points 4 bits low nibble first, 8 when
absent), and ONNX Runtime's own MatMulNBits at accuracy level 1 on the same inputs; end to end, HF transformers with
the round-to-nearest INT4 weights. Tolerance of the single products: 2e-6 of the largest |y|. Both sides are fp32
sums of K = 256 products of the same fp32 weights ((u - zp) * s rounded once) in different orders; fp32's unit
roundoff is 6e-8, so a reordering moves a sum by at most about sqrt(K) * 6e-8 * sum|terms| (sum|terms| is a few
times |y|'s largest entry for these random inputs); a wrong nibble, block or scale moves it by 1e-2 or more.
"""
from __future__ import annotations

import ctypes

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qwen_vl_trt.model.weight_formats import WeightFormats
from qwen_vl_trt.runtime.backends import ort_int4_kernel
from test_int4 import rtn_int4

LIBRARY = ort_int4_kernel.library()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="needs build/ort/libqwen_vl_ort_kernels.so (bash "
                                "plugins/ortMatMulInt4/build.sh) and a CPU with AVX-512F")
K, N = 256, 37  # N: not a multiple of the kernels' 4-, 16- and 64-column groups
RTOL = 2e-6


def random_weight(rng, n: int, k: int, block: int, zero_points: bool):
    blocks = k // block
    packed = rng.integers(0, 256, size=(n, blocks, block // 2), dtype=np.uint8)
    scales = (rng.standard_normal((n, blocks)) * 0.02).astype(np.float32)
    zp = rng.integers(0, 256, size=(n, (blocks + 1) // 2), dtype=np.uint8) if zero_points else None
    return packed, scales, zp


def definition(x, packed, scales, zp, block: int) -> np.ndarray:
    """MatMulNBits (bits 4) in float64: y = x @ ((u - zp) * s)^T with the weights as fp32 rounds them."""
    n, blocks, _ = packed.shape
    k = blocks * block
    flat = packed.reshape(n, k // 2).astype(np.int32)
    u = np.empty((n, k), np.int32)
    u[:, 0::2], u[:, 1::2] = flat & 15, flat >> 4
    if zp is None:
        z = np.full((n, blocks), 8, np.int32)
    else:
        z = np.empty((n, zp.shape[1] * 2), np.int32)
        z[:, 0::2], z[:, 1::2] = zp & 15, zp >> 4
        z = z[:, :blocks]
    w = ((u - np.repeat(z, block, axis=1)).astype(np.float32) * np.repeat(scales, block, axis=1)).astype(np.float64)
    return x.astype(np.float64) @ w.T


def one_node_session(domain: str, op: str, packed, scales, zp, block: int, rank: int = 2, **extra):
    n, blocks, _ = packed.shape
    inits = [onnx.numpy_helper.from_array(packed, "B"), onnx.numpy_helper.from_array(scales.reshape(-1), "scales")]
    inputs = ["A", "B", "scales"]
    if zp is not None:
        inits.append(onnx.numpy_helper.from_array(zp.reshape(-1), "zp"))
        inputs.append("zp")
    node = helper.make_node(op, inputs, ["Y"], domain=domain, K=blocks * block, N=n, bits=4, block_size=block,
                            **extra)
    dims = ["b", "m"][-(rank - 1):] if rank > 1 else []
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [*dims, blocks * block])
    graph = helper.make_graph([node], "g", [a],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if domain == ort_int4_kernel.DOMAIN:
        opts.register_custom_ops_library(str(LIBRARY))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("zero_points", [False, True])
@pytest.mark.parametrize("block", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 2, 47, 100])
def test_matmul_int4_equals_the_definition_and_matmul_nbits(m, block, zero_points):
    """M = 1 (the decode kernel) and M > 1 (the prefill kernel, with 48-row tiles and their 16- and 32-row tails)."""
    rng = np.random.default_rng(m * 1000 + block + zero_points)
    packed, scales, zp = random_weight(rng, N, K, block, zero_points)
    x = rng.standard_normal((m, K)).astype(np.float32)
    want = definition(x, packed, scales, zp, block)
    ours = one_node_session("qwen_vl", "MatMulInt4", packed, scales, zp, block).run(None, {"A": x})[0]
    mlas = one_node_session("com.microsoft", "MatMulNBits", packed, scales, zp, block,
                            accuracy_level=1).run(None, {"A": x})[0]
    scale = np.abs(want).max()
    assert ours.shape == (m, N) and ours.dtype == np.float32
    assert np.abs(ours - want).max() <= RTOL * scale
    assert np.abs(ours - mlas).max() <= 2 * RTOL * scale


def test_matmul_int4_keeps_leading_dims_and_handles_many_columns():
    """A [2, 3, K] -> Y [2, 3, N]; N = 4100 spans many parallel tasks of both kernels (64 and 16 columns) and a tail."""
    rng = np.random.default_rng(7)
    packed, scales, _ = random_weight(rng, 4100, K, 32, False)
    sess = one_node_session("qwen_vl", "MatMulInt4", packed, scales, None, 32, rank=3)
    for shape in [(2, 3, K), (1, 1, K)]:
        x = rng.standard_normal(shape).astype(np.float32)
        y = sess.run(None, {"A": x})[0]
        want = definition(x.reshape(-1, K), packed, scales, None, 32).reshape(*shape[:-1], 4100)
        assert y.shape == want.shape
        assert np.abs(y - want).max() <= RTOL * np.abs(want).max()


@pytest.mark.parametrize("m", [1, 13])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("k", [384, 640, 1024])
def test_kernels_over_spans_and_their_tails(k, block, m):
    """K = 384 and 640 (K % 256 == 128) and 1024. M = 1: the decode kernel's last span of 256 k is then half a span,
    whose second 64 bytes belong to the next column; N = 200: tasks of 64 columns walked as 4 streams of 16, and a
    last task of 8 (4 streams of 2). M = 13: the prefill kernel over the same K (one tile of 16 rows, 13 of them
    real). Tolerance as above (K up to 1024: sqrt(K) * 6e-8 * a few is still under 2e-6 of the largest |y|)."""
    rng = np.random.default_rng(k + block + m)
    packed, scales, _ = random_weight(rng, 200, k, block, False)
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = definition(x, packed, scales, None, block)
    ours = one_node_session("qwen_vl", "MatMulInt4", packed, scales, None, block).run(None, {"A": x})[0]
    assert np.abs(ours - want).max() <= RTOL * np.abs(want).max()


@pytest.mark.parametrize("block", [32, 128])
def test_decode_kernel_keeps_each_activation_to_its_32_group(block):
    """The decode kernel's precision contract (matMulInt4Vnni.cpp): every activation is kept to 2^-22 of the largest
    |x| among the 32 aligned k around it (it scales groups of 16 inside them by powers of two), then fp32 sums. Each
    32 k of the activations get their own magnitude, 2^-30 .. 2^30, and column n has nonzero weights (u != 8) in
    one group of 32 only, n % (K / 32): its output is that group's alone, so a coarser grouping (one scale per 128
    or 256 k, per block or per tensor) rounds a small group next to a large one away and breaks the bound: per n,
        |y - y_def| <= 2^-22 * sum_k max32(k) |w_nk| + (K / 16 + 8) * 2^-24 * sum_k |x_k w_nk|,
    the second term the fp32 rounding of the conversions, the scalings and the sums (K / 16 lane sums a column)."""
    k, n = 640, 60
    rng = np.random.default_rng(block)
    packed, scales, _ = random_weight(rng, n, k, block, False)
    flat = packed.reshape(n, k // 2)
    for column in range(n):
        group = column % (k // 32)
        flat[column, :16 * group] = 0x88
        flat[column, 16 * (group + 1):] = 0x88
    x = (rng.standard_normal((1, k)) * np.repeat(2.0 ** rng.integers(-30, 31, size=k // 32), 32)).astype(np.float32)
    want = definition(x, packed, scales, None, block)
    ours = one_node_session("qwen_vl", "MatMulInt4", packed, scales, None, block).run(None, {"A": x})[0]
    u = np.empty((n, k), np.int32)
    u[:, 0::2], u[:, 1::2] = flat & 15, flat >> 4
    w = np.abs((u - 8).astype(np.float64) * np.repeat(scales, block, axis=1))
    group_max = np.repeat(np.abs(x[0].astype(np.float64)).reshape(-1, 32).max(axis=1), 32)
    bound = 2.0 ** -22 * (w @ group_max) + (k / 16 + 8) * 2.0 ** -24 * (w @ np.abs(x[0].astype(np.float64)))
    assert np.all(np.abs(ours[0] - want[0]) <= bound)


def test_scalar_reference_kernel_equals_the_definition():
    """The fallback of CPUs without AVX-512F (qwen_vl_matmul_int4 with reference=1), and the vectorized kernels
    called without ONNX Runtime, agree with the definition."""
    lib = ctypes.CDLL(str(LIBRARY))
    ptr = ctypes.c_void_p
    lib.qwen_vl_matmul_int4.argtypes = [ptr, ptr, ctypes.c_int64, ptr, ptr, ptr, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int]
    rng = np.random.default_rng(3)
    for m, block, zero_points in [(1, 32, True), (5, 64, False), (50, 128, True)]:
        packed, scales, zp = random_weight(rng, N, K, block, zero_points)
        x = rng.standard_normal((m, K)).astype(np.float32)
        want = definition(x, packed, scales, zp, block)
        for reference in (1, 0):
            y = np.zeros((m, N), np.float32)
            rc = lib.qwen_vl_matmul_int4(x.ctypes.data, y.ctypes.data, m, packed.ctypes.data, scales.ctypes.data,
                                         None if zp is None else zp.ctypes.data, N, K, block, reference)
            assert rc == 0
            assert np.abs(y - want).max() <= RTOL * np.abs(want).max(), (m, block, reference)


def test_attributes_it_cannot_run_are_one_error_at_load():
    rng = np.random.default_rng(0)
    packed, scales, _ = random_weight(rng, N, K, 32, False)
    with pytest.raises(Exception, match="qwen_vl::MatMulInt4: needs bits 4"):
        one_node_session("qwen_vl", "MatMulInt4", packed, scales, None, 48)  # K = 256 is no multiple of 48


def test_rename_takes_only_the_nodes_it_runs():
    """MatMulNBits at accuracy level 4 (int8 activations), with a bias, or with fp16 scales stays ONNX Runtime's."""
    f32 = helper.make_tensor("s32", TensorProto.FLOAT, [1], [1.0])
    f16 = helper.make_tensor("s16", TensorProto.FLOAT16, [1], [1.0])

    def nbits(name, scales, level=1, bias=False):
        return helper.make_node("MatMulNBits", ["A", "B", scales, "", "", "bias"][:6 if bias else 3], [name],
                                domain="com.microsoft", K=64, N=8, bits=4, block_size=32, accuracy_level=level)

    nodes = [nbits("y1", "s32"), nbits("y2", "s32", level=4), nbits("y3", "s32", bias=True), nbits("y4", "s16"),
             nbits("y5", "s32", level=0)]
    graph = helper.make_graph(nodes, "g", [], [], initializer=[f32, f16])
    model = helper.make_model(graph)
    assert ort_int4_kernel.rename_matmul_nbits(model) == 2
    renamed = [n.output[0] for n in model.graph.node if n.op_type == "MatMulInt4" and n.domain == "qwen_vl"]
    assert renamed == ["y1", "y5"]
    assert any(o.domain == "qwen_vl" for o in model.opset_import)


def test_library_switch(monkeypatch):
    monkeypatch.setenv(ort_int4_kernel.ENV, "off")
    assert ort_int4_kernel.library() is None
    monkeypatch.setenv(ort_int4_kernel.ENV, "/nonexistent/lib.so")
    assert ort_int4_kernel.library() is None
    monkeypatch.setenv(ort_int4_kernel.ENV, str(LIBRARY))
    assert ort_int4_kernel.library() == LIBRARY


BLOCK = 32
FORMATS = WeightFormats(attention="int4", mlp="int4", int4_block=BLOCK)


@pytest.fixture(scope="module")
def int4_artifacts(qwen3_vl_ckpt, tmp_path_factory):
    from qwen_vl_trt.export.export_all import export_all

    return export_all(qwen3_vl_ckpt, tmp_path_factory.mktemp("int4_kernel_art"), "fp32", formats=FORMATS).parent


def cached_decoder_ops(cache) -> list[str]:
    entries = sorted(cache.glob("decoder*/model.onnx"))
    assert len(entries) == 1, entries
    model = onnx.load(str(entries[0]), load_external_data=False)
    return [n.op_type for n in model.graph.node]


def test_runtime_runs_matmul_int4_and_generates_like_hf(qwen3_vl_ckpt, int4_artifacts, tmp_path):
    """load_model on INT4 artifacts (fp32 activations, block 32): the cached decoder's INT4 products are MatMulInt4
    (none is MatMulNBits), a second load hits that entry, and the greedy tokens equal HF generate's with the same
    INT4 weights, as they do with --int4-kernel mlas (ONNX Runtime's MatMulNBits)."""
    from hf_reference import hf_model
    from qwen_vl_trt.export.int4 import QUANTIZED
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    hf = hf_model(qwen3_vl_ckpt)
    with torch.no_grad():
        for name, module in hf.model.language_model.named_modules():
            if (isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED
                    and module.in_features % BLOCK == 0):
                module.weight.copy_(rtn_int4(module.weight, BLOCK))
    tokens = {}
    for kernel in ("auto", "mlas"):
        cache = tmp_path / kernel
        model = load_model(int4_artifacts, "onnxruntime", ort_cache=cache, int4_kernel=kernel)
        ops = cached_decoder_ops(cache)
        if kernel == "auto":
            assert "MatMulInt4" in ops and "MatMulNBits" not in ops
            assert model.sessions["decoder"].cache_hit is False
            again = load_model(int4_artifacts, "onnxruntime", ort_cache=cache)
            assert again.sessions["decoder"].cache_hit is True
        else:
            assert "MatMulNBits" in ops and "MatMulInt4" not in ops
        req = Preprocessor(model.manifest).prepare(Request("Say something about int4."))
        tokens[kernel] = generate(model, [req], Sampler(SamplingConfig(temperature=0)), 16, ignore_eos=True)[0]
    ids = torch.tensor([req.input_ids])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert tokens["auto"].token_ids == ref[0, ids.shape[1]:].tolist()
    assert tokens["mlas"].token_ids == tokens["auto"].token_ids


def test_int8_activations_and_no_cache_keep_matmul_nbits(int4_artifacts, tmp_path):
    """--int4-activations int8 (accuracy level 4) is MLAS's kernel; so is a load without a cache folder."""
    from qwen_vl_trt.runtime.generate import load_model

    load_model(int4_artifacts, "onnxruntime", ort_cache=tmp_path, int4_activations="int8")
    assert "MatMulNBits" in cached_decoder_ops(tmp_path) and "MatMulInt4" not in cached_decoder_ops(tmp_path)
    model = load_model(int4_artifacts, "onnxruntime", ort_cache=False)
    assert model.sessions["decoder"].int4_kernel is None
