"""INT4 decode products on ONNX Runtime's CPU provider: MatMulNBits accuracy level x block size x layout x zero
points, one token (M = 1, or `--m` rows: a prefill), the shapes of the decoder's linears (a script: which INT4
export defaults to ship, and how our qwen_vl::MatMulInt4 kernel compares).

  python bench/bench_matmulnbits.py [--layers 4] [--hidden 2048] [--inter 6144] [--q 2048] [--kv 1024]
      [--vocab 151936] [--blocks 32 64 128] [--levels 0 1 4 ours] [--threads 2] [--rounds 5] [--calls 10]
      [--layouts split fused down gate_up] [--zero-points no yes] [--lm-head] [--m 1] [--no-spin]

`--levels ours`: the same graph with its nodes renamed to qwen_vl::MatMulInt4 (runtime/backends/ort_int4_kernel.py,
fp32 activations; needs build/ort/libqwen_vl_ort_kernels.so). `ours=LIB` loads the op from the library LIB instead
(two builds of the kernel timed round robin in one run: `--levels ours ours=/tmp/variant.so`).

Each configuration is one graph of `--layers` decoder layers' products as com.microsoft.MatMulNBits nodes in the
layout export/int4.py writes (B uint8 [N, K/B, B/2], scales fp32 [N * K/B]; no zero-point input = the kernel's
default 8, i.e. symmetric):
- `split`: q, k, v, o, gate, up, down: seven products per layer (what decoder.onnx holds);
- `fused`: q|k|v as one product of width q + 2 kv, gate|up as one of width 2 * inter, o, down: four per layer
  (export/int4.py `fuse_int4_products` on decoder.ort.onnx);
- `down`, `gate_up`: only that product of each layer (one shape, to time a kernel on it);
- `--zero-points yes`: the same with an explicit packed uint4 zero point 8 per block.
`--lm-head`: one more graph per (block, zero points): lm_head alone ([1, hidden] @ [hidden, vocab]).
`--no-spin`: the sessions' intra-op threads do not spin after a run. All sessions live in this one process; with
spinning (ONNX Runtime's default, what a decoder runs with) the idle sessions' threads keep the 2 cores busy for a
while after their turn and slow the session being timed (1.5-2x, docs/benchmarks.md): use it for kernel A/Bs.

Every session of one graph (the levels) and every graph are timed round robin: `--rounds` rounds, each round
`--calls` calls of every session in turn, so a busy machine slows all of them alike; the table gives the median
ms per call over the rounds and, per configuration, the median over the rounds of its time / the first row's
time in the same round (the figure to read on a busy machine). 4 layers are ~100 MB of INT4 weights,
twice this machine's 48 MB L3, so a call streams its weights from memory as a decode step does. Random packed
weights and N(0, 1) activations; the "max rel err" column compares each product with the float64 product of the
dequantized weights (numpy), so level 1 (fp32 activations) shows fp32 rounding only and level 4 the error of
int8 activations.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import machine, utc_now  # noqa: E402


def products(layout: str, hidden: int, inter: int, q: int, kv: int, layers: int) -> list[tuple[str, int, int]]:
    """(name, K, N) of every product of `layers` decoder layers in `layout`."""
    per = {"split": [("q", hidden, q), ("k", hidden, kv), ("v", hidden, kv), ("o", q, hidden),
                     ("gate", hidden, inter), ("up", hidden, inter), ("down", inter, hidden)],
           "fused": [("qkv", hidden, q + 2 * kv), ("o", q, hidden), ("gate_up", hidden, 2 * inter),
                     ("down", inter, hidden)],
           "down": [("down", inter, hidden)], "gate_up": [("gate_up", hidden, 2 * inter)]}[layout]
    return [(f"l{i}.{n}", k, nn) for i in range(layers) for n, k, nn in per]


def nbits_graph(path: Path, prods, block: int, zero_points: bool, rng) -> tuple[Path, dict]:
    """path: one MatMulNBits per product, input x_K [1, K] per distinct K, output y_<name> [1, N] ->
    (path, name -> (packed uint8 [N, K/B, B/2], scales fp32 [N, K/B])) for the numpy reference."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs, weights, ins = [], [], [], {}, {}
    for name, k, n in prods:
        packed = rng.integers(0, 256, size=(n, k // block, block // 2), dtype=np.uint8)
        scales = (rng.random((n, k // block), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
        weights[name] = (packed, scales)
        inputs = [f"x{k}", f"{name}.B", f"{name}.s"]
        inits += [numpy_helper.from_array(packed, f"{name}.B"), numpy_helper.from_array(scales.reshape(-1), f"{name}.s")]
        if zero_points:  # uint4 8 per block, two per byte: [N * ceil(K/B / 2)]
            zp = np.full(n * ((k // block + 1) // 2), 0x88, np.uint8)
            inits.append(numpy_helper.from_array(zp, f"{name}.zp"))
            inputs.append(f"{name}.zp")
        ins[k] = helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["m", k])
        nodes.append(helper.make_node("MatMulNBits", inputs, [f"y_{name}"], name=name, domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=block))
        outs.append(helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["m", n]))
    graph = helper.make_graph(nodes, "nbits", list(ins.values()), outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path, weights


def dequantized(packed, scales, block: int) -> np.ndarray:
    """W [K, N] float64 = (nibble - 8) * scale, low nibble first (export/int4.py to_matmul_nbits' layout)."""
    n, nb, _ = packed.shape
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, nb, block).astype(np.float64) - 8
    return (q * scales[..., None].astype(np.float64)).reshape(n, nb * block).T


def session(path: Path, level: str, threads: int, spin: bool = True):
    """A session whose MatMulNBits nodes all run at `level` (the attribute is set in a copy of the graph), or, for
    level "ours", as qwen_vl::MatMulInt4 (level "ours=LIB": from the library LIB, e.g. a variant build to A/B)."""
    import onnx
    import onnxruntime as ort

    from qwen_vl_trt.runtime.backends import ort_int4_kernel

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        node.attribute.append(onnx.helper.make_attribute("accuracy_level", 1 if ours(level) else int(level)))
    opts = ort.SessionOptions()
    if ours(level):
        library = Path(level.split("=", 1)[1]) if "=" in level else ort_int4_kernel.library()
        if library is None:
            raise SystemExit("--levels ours: build/ort/libqwen_vl_ort_kernels.so is not built (bash "
                             "plugins/ortMatMulInt4/build.sh) or this CPU has no AVX-512F")
        assert ort_int4_kernel.rename_matmul_nbits(model) == len(model.graph.node)
        opts.register_custom_ops_library(str(library))
    leveled = path.with_name(f"{path.stem}.l{len(list(path.parent.glob(path.stem + '.l*')))}.onnx")
    onnx.save_model(model, str(leveled))
    opts.intra_op_num_threads = threads
    if not spin:  # idle sessions' pool threads stop spinning (they share 2 cores with the session being timed)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(leveled), opts, providers=["CPUExecutionProvider"])


def ours(level: str) -> bool:
    """Whether `level` names our kernel: "ours" (build/ort's library) or "ours=LIB"."""
    return level == "ours" or level.startswith("ours=")


def level_name(level: str) -> str:
    """A --levels value that parses: 0-4, ours, or ours=PATH to a library."""
    if level in ("0", "1", "2", "3", "4") or ours(level):
        return level
    raise argparse.ArgumentTypeError(f"{level!r}: a level is 0-4, ours or ours=PATH")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=6144)
    ap.add_argument("--q", type=int, default=2048)
    ap.add_argument("--kv", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--levels", nargs="+", default=["0", "1", "4"], type=level_name,
                    help="MatMulNBits accuracy levels 0-4; ours = qwen_vl::MatMulInt4 (build/ort's library); "
                         "ours=LIB: the same from the library LIB (same-run A/B of two builds)")
    ap.add_argument("--m", type=int, default=1, help="rows of the activations (1: a decode step)")
    ap.add_argument("--layouts", nargs="*", default=["split", "fused"], choices=["split", "fused", "down", "gate_up"])
    ap.add_argument("--zero-points", nargs="+", default=["no"], choices=["no", "yes"])
    ap.add_argument("--lm-head", action="store_true", help="also lm_head alone, per block and zero points")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-spin", action="store_true",
                    help="sessions' intra-op threads do not spin between runs (session.intra_op.allow_spinning 0)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    configs = [(lay, b, zp) for lay in args.layouts for b in args.blocks for zp in args.zero_points]
    if args.lm_head:
        configs += [("lm_head", b, zp) for b in args.blocks for zp in args.zero_points]
    sessions, errors = {}, {}
    with tempfile.TemporaryDirectory(prefix="qwen-vl-nbits-") as tmp:
        for lay, block, zp in configs:
            prods = ([("lm_head", args.hidden, args.vocab)] if lay == "lm_head" else
                     products(lay, args.hidden, args.inter, args.q, args.kv, args.layers))
            path, weights = nbits_graph(Path(tmp) / f"{lay}_b{block}_zp{zp}.onnx", prods, block, zp == "yes", rng)
            feeds = {f"x{k}": rng.standard_normal((args.m, k), np.float32) for _, k, _ in prods}
            name, k, _ = prods[-1]
            ref = feeds[f"x{k}"].astype(np.float64) @ dequantized(*weights[name], block)
            del weights
            for level in args.levels:
                sess = session(path, level, args.threads, spin=not args.no_spin)
                y = sess.run([f"y_{name}"], feeds)[0]
                errors[(lay, block, zp, level)] = float(np.abs(y - ref).max() / np.abs(ref).max())
                sessions[(lay, block, zp, level)] = (sess, feeds)
            gc.collect()
        times = {key: [] for key in sessions}
        for _ in range(args.rounds):
            for key, (sess, feeds) in sessions.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    sess.run(None, feeds)
                times[key].append((time.perf_counter() - t0) * 1e3 / args.calls)
    print(f"# MatMulNBits (INT4, M = {args.m}), ONNX Runtime CPU -- {utc_now()}")
    print(f"machine: {machine()}; {args.threads} threads; {args.layers} layers of hidden {args.hidden}, MLP "
          f"{args.inter}, q {args.q}, kv {args.kv}; lm_head vocab {args.vocab}")
    print(f"command: python bench/bench_matmulnbits.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print("| products | block | zero points | accuracy level | ms per call (median, min-max) | vs first row of "
          "its products (median of per-round ratios) | max rel err vs float64 |")
    print("|---|---|---|---|---|---|---|")
    first = {}
    for (lay, block, zp, level), ts in times.items():
        base = first.setdefault("layers" if lay in ("split", "fused") else lay, ts)
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"| {lay} | {block} | {zp} | {level} | {statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f}) | "
              f"{ratio:.2f} | {errors[(lay, block, zp, level)]:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
