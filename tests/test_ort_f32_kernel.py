"""qwen_vl::MatMulF32, our ONNX Runtime custom op for a dense fp32 decoder's products on memory-mapped weights
(plugins/ortMatMulInt4/matMulF32*.cpp, runtime/backends/ort_f32_kernel.py).

References: numpy's float64 product of the same fp32 inputs, and ONNX Runtime's own MatMul / Gemm on them; end to
end, HF transformers' fp32 greedy tokens of the tiny checkpoint. Tolerance of the single products, per element
(`bound`): 4 * sqrt(K) * 2^-24 * sum_k |x_k w_k|. An fp32 sum of K terms rounds each partial sum by at most 2^-24 of
it; those roundings are independent and of either sign, so their total is about sqrt(K) * 2^-24 * sum|terms| (the
factor 4 covers the tail of that distribution and the other side's own rounding). For N(0, 1) inputs and K = 2050
that is 1.4e-2 against terms of 0.64 on average: a wrong row, column, tail or partial sum moves y by whole terms.
"""
from __future__ import annotations

import ctypes
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen_vl_trt.runtime.backends import ort_f32_kernel, ort_int4_kernel

LIBRARY = ort_int4_kernel.library()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="needs build/ort/libqwen_vl_ort_kernels.so (bash "
                                "plugins/ortMatMulInt4/build.sh) and a CPU with AVX-512F")


def bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per element of x @ w: 4 * sqrt(K) * 2^-24 * (|x| @ |w|) (the module's docstring)."""
    return 4 * np.sqrt(x.shape[-1]) * 2.0 ** -24 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))


def product_session(w: np.ndarray, op: str, rank: int = 2, ours: bool = True, **attrs):
    """One node: ours (qwen_vl::MatMulF32 after rename_dense_products) or ONNX Runtime's MatMul / Gemm on weight w."""
    dims = ["b", "m", "k"][-rank:]
    k = w.shape[1] if attrs.get("transB") else w.shape[0]
    dims[-1] = k
    node = helper.make_node(op, ["A", "W"], ["Y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if ours:
        assert ort_f32_kernel.rename_dense_products(model) == 1
        opts.register_custom_ops_library(str(LIBRARY))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("m", [1, 2, 13, 47, 100])
@pytest.mark.parametrize("k,n", [(256, 37), (300, 1000), (7, 3), (2050, 70)])
def test_matmul_equals_float64_and_onnxruntime(m, k, n):
    """W [K, N] (MatMul): M = 1 (rows of W split among tasks, partial sums added), M > 1 (32-column panels, 12-, 6-,
    3- and 1-row tiles); N and K that are not multiples of 16 or 32 (the masked tails)."""
    rng = np.random.default_rng(m * 7919 + k + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    ours = product_session(w, "MatMul").run(None, {"A": x})[0]
    theirs = product_session(w, "MatMul", ours=False).run(None, {"A": x})[0]
    assert ours.shape == (m, n) and ours.dtype == np.float32
    assert (np.abs(ours - want) <= bound(x, w)).all()
    assert (np.abs(ours - theirs) <= 2 * bound(x, w)).all()


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("k,n", [(2048, 130), (33, 65)])
def test_gemm_transposed_equals_float64_and_onnxruntime(m, k, n):
    """W [N, K] (Gemm transB = 1, lm_head): one dot product per row of W and row of x, K tails masked."""
    rng = np.random.default_rng(m + k + n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    ours = product_session(w, "Gemm", transB=1).run(None, {"A": x})[0]
    theirs = product_session(w, "Gemm", ours=False, transB=1).run(None, {"A": x})[0]
    assert ours.shape == (m, n)
    assert (np.abs(ours - want) <= bound(x, w.T)).all()
    assert (np.abs(ours - theirs) <= 2 * bound(x, w.T)).all()


def test_leading_dims_long_k_and_the_scalar_reference():
    """A [2, 3, K] -> Y [2, 3, N] and [1, 1, K] (a decode step); K = 6144 (the MLP's down projection); the scalar
    definition (qwen_vl_matmul_f32 with reference = 1) and the vectorized kernels without ONNX Runtime agree."""
    rng = np.random.default_rng(5)
    k, n = 6144, 96
    w = rng.standard_normal((k, n)).astype(np.float32)
    sess = product_session(w, "MatMul", rank=3)
    for shape in [(2, 3, k), (1, 1, k)]:
        x = rng.standard_normal(shape).astype(np.float32)
        want = x.astype(np.float64) @ w.astype(np.float64)
        y = sess.run(None, {"A": x})[0]
        assert y.shape == want.shape
        assert (np.abs(y - want) <= bound(x, w)).all()
    lib = ctypes.CDLL(str(LIBRARY))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.qwen_vl_matmul_f32.argtypes = [ptr, ptr, i64, ptr, i64, i64, ctypes.c_int, ctypes.c_int]
    for m, kk, nn, transposed in [(1, 300, 37, 0), (5, 300, 37, 0), (2, 300, 37, 1)]:
        w = rng.standard_normal((nn, kk) if transposed else (kk, nn)).astype(np.float32)
        x = rng.standard_normal((m, kk)).astype(np.float32)
        want = x.astype(np.float64) @ (w.T if transposed else w).astype(np.float64)
        for reference in (1, 0):
            y = np.zeros((m, nn), np.float32)
            lib.qwen_vl_matmul_f32(x.ctypes.data, y.ctypes.data, m, w.ctypes.data, kk, nn, transposed, reference)
            assert (np.abs(y - want) <= bound(x, w.T if transposed else w)).all(), (m, transposed, reference)


def test_rename_takes_only_the_products_it_runs():
    """MatMul on a 2-D fp32 initializer and Gemm with transB, no C, alpha 1 are renamed; a MatMul of two
    activations, a Gemm with a bias, alpha or without transB, and an fp16 weight are not."""
    f32 = lambda name, shape: numpy_helper.from_array(np.zeros(shape, np.float32), name)  # noqa: E731
    inits = [f32("w", (4, 4)), f32("w3", (2, 4, 4)), f32("c", (4,)),
             numpy_helper.from_array(np.zeros((4, 4), np.float16), "h")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]),                          # renamed
             helper.make_node("Gemm", ["x", "w"], ["b"], transB=1),                  # renamed (lm_head)
             helper.make_node("MatMul", ["x", "a"], ["c1"]),                         # two activations
             helper.make_node("MatMul", ["x", "w3"], ["c2"]),                        # 3-D weight
             helper.make_node("Gemm", ["x", "w", "c"], ["c3"], transB=1),            # bias
             helper.make_node("Gemm", ["x", "w"], ["c4"], transB=1, alpha=2.0),      # alpha
             helper.make_node("Gemm", ["x", "w"], ["c5"]),                           # no transB
             helper.make_node("MatMul", ["xh", "h"], ["c6"])]                        # fp16
    model = helper.make_model(helper.make_graph(nodes, "g", [], [], inits))
    assert ort_f32_kernel.rename_dense_products(model) == 2
    renamed = [(n.domain, n.op_type) for n in model.graph.node]
    assert renamed[:2] == [("qwen_vl", "MatMulF32")] * 2 and all(d == "" for d, _ in renamed[2:])
    assert [a.name for a in model.graph.node[1].attribute] == ["transB"]
    assert any(o.domain == "qwen_vl" for o in model.opset_import)


@pytest.fixture(scope="module")
def dense_export(qwen3_vl_ckpt, tmp_path_factory):
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits

    limits = Limits(max_patches=1024, max_batch=1, max_seq=256, max_cache_len=512)
    return export_all(qwen3_vl_ckpt, tmp_path_factory.mktemp("f32_kernel_dense"), "fp32", limits).parent


def test_runtime_runs_the_dense_decoder_on_matmul_f32_and_generates_like_hf(dense_export, qwen3_vl_ckpt,
                                                                           hf_qwen3_vl, tmp_path, monkeypatch):
    """The default load of a dense fp32 decoder on the CPU: every weight product of decoder.ort.onnx runs as
    MatMulF32 on the mapped weights (no prepacking), from a renamed graph (no weights) in the default cache, read
    back on the next start; tokens == HF fp32 greedy, and one prefill step's outputs equal ONNX Runtime's MatMul /
    Gemm session's (dense_kernel="mlas") to fp32 reordering (rtol 1e-4 of each output's largest |value|: hidden
    states pass 2 layers of products summed in other orders). dense_kernel="mlas" and QWEN_VL_ORT_KERNELS=off keep
    ONNX Runtime's kernels."""
    import hf_processor as H
    from decoder_feeds import prefill_feeds
    from hf_reference import hf_greedy_new_tokens
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    prompt, n_new = "Write a haiku about memory bandwidth.", 12
    processor = H.qwen3_processor(qwen3_vl_ckpt)
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = hf_greedy_new_tokens(hf_qwen3_vl, processor(text=[text], return_tensors="pt"), n_new)

    def greedy(model):
        req = Preprocessor(model.manifest).prepare(Request(prompt))
        return generate(model, [req], Sampler(SamplingConfig(temperature=0)), n_new, ignore_eos=True)[0].token_ids

    art = shutil.copytree(dense_export, tmp_path / "dense")
    first = load_model(art, "onnxruntime")
    decoder = first.sessions["decoder"]
    assert decoder.f32_kernel == LIBRARY and decoder.cache_hit is False
    (entry,) = (art / ".ort-cache").iterdir()
    graph = onnx.ModelProto.FromString((entry / "graph.pb").read_bytes()).graph
    exported = onnx.load(str(art / "decoder.ort.onnx"), load_external_data=False)
    products = [n for n in exported.graph.node if n.op_type in ("MatMul", "Gemm")
                and any(i in {t.name for t in exported.graph.initializer} for i in n.input[1:2])]
    assert products and sum(n.op_type == "MatMulF32" for n in graph.node) == len(products)
    assert not graph.initializer[0].raw_data  # weights stay in the artifact folder's .onnx.data
    model = load_model(art, "onnxruntime")
    assert model.sessions["decoder"].cache_hit is True
    assert greedy(model) == want
    assert greedy(first) == want

    mlas = load_model(art, "onnxruntime", dense_kernel="mlas", io_binding=False)
    assert mlas.sessions["decoder"].f32_kernel is None
    ours = load_model(art, "onnxruntime", io_binding=False)
    feeds = prefill_feeds(ours.spec, np.random.default_rng(0))
    a, b = (m.sessions["decoder"].run(dict(feeds)) for m in (mlas, ours))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-4 * max(np.abs(a[key]).max(), 1e-30),
                                   err_msg=key)
    monkeypatch.setenv(ort_int4_kernel.ENV, "off")
    assert load_model(art, "onnxruntime").sessions["decoder"].f32_kernel is None
