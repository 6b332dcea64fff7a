"""The tensor-parallel step of a GPU visit (bench/gpu_visit.sh `tp`; issue 22 item 5): TensorRT's DistCollective
layers and NCCL through runtime/backends/trt_tp.py on real GPUs, logits compared with ONNX Runtime on the CPU.

    world size 1 (any GPU): a tiny random Qwen3-VL decoder exported as a rank graph of 1 rank that *keeps* its
        DistCollective nodes (nb_rank=1; `--tp 1` writes none), built with full TensorRT, opened by
        trt_tp.open_decoder_ranks (ncclCommInitAll over [0], set_communicator), one prefill step -> logits vs the
        same graph on ONNX Runtime's CPU provider (its DistCollective body is Identity)
    TP 2 (only when `nvidia-smi -L` lists >= 2 GPUs, else "skipped: 1 GPU"): the --tp 2 rank graphs, two engines,
        two devices, one prefill step -> logits vs the 1-rank decoder.onnx on ONNX Runtime (CPU)

fp32 graphs, tolerance 2e-2 absolute on logits of magnitude ~1 (TensorRT may run fp32 MatMuls in TF32, ~1e-3
relative; ONNX Runtime's CPU provider in fp32) and the same argmax. Prints one line per part; the last lines go to
the visit's summary. Exit 0 done, 4 skipped (no full TensorRT, no cuda-python or no GPU: the line says which),
1 failed, 3 in a rehearsal (no GPU expected: everything up to the CUDA calls ran).

    python bench/tp_visit.py WORK [--rehearse]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import ensure_importable  # noqa: E402

ensure_importable(ROOT)

from qwen_vl_trt.model.contracts import Limits, dim_ranges  # noqa: E402

LIMITS = Limits(max_patches=64, max_frames=1, max_batch=1, max_seq=16, max_cache_len=32)
SEQ, ATOL = 8, 2e-2
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.1f} s] {msg}", flush=True)


def export(work: Path):
    """-> (spec, dir of decoder.onnx (1 rank), dir of decoder.rank0.onnx with nb_rank=1 collectives, dir of the
    --tp 2 rank graphs)."""
    import dataclasses

    from qwen_vl_trt.export.decoder import export_decoder
    from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_TINY, make_checkpoint
    from qwen_vl_trt.export.tp import TensorParallel
    from qwen_vl_trt.export.weights import CheckpointWeights
    from qwen_vl_trt.model.spec import ModelSpec

    @dataclasses.dataclass(frozen=True)
    class KeepCollectives(TensorParallel):  # world size 1 with its DistCollective nodes written (nb_rank=1)
        @property
        def active(self) -> bool:
            return True

    ckpt = make_checkpoint(work / "ckpt", "qwen3_vl", seed=7,
                           config_overrides={"text_config": {**QWEN3_VL_TINY["text_config"], "intermediate_size": 48}})
    spec, weights = ModelSpec.from_checkpoint(ckpt), CheckpointWeights(ckpt)
    dirs = {k: work / k for k in ("whole", "ws1", "tp2")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    export_decoder(spec, weights, dirs["whole"], "float32")
    export_decoder(spec, weights, dirs["ws1"], "float32", tp=KeepCollectives(0, 1))
    for r in range(2):
        export_decoder(spec, weights, dirs["tp2"], "float32", tp=TensorParallel(r, 2))
    return spec, dirs


def feeds(spec) -> dict:
    t, rng = spec.text, np.random.default_rng(0)
    out = {"inputs_embeds": rng.standard_normal((1, SEQ, t.hidden_size)).astype(np.float32),
           "position_ids": np.tile(np.arange(SEQ, dtype=np.int64), (3, 1, 1)),
           "past_lengths": np.zeros(1, np.int64), "logits_index": np.array([SEQ - 1], np.int64)}
    if spec.num_deepstack:
        out["deepstack_embeds"] = rng.standard_normal((spec.num_deepstack, 1, SEQ, t.hidden_size)).astype(np.float32)
    cache = np.zeros((1, t.num_key_value_heads, LIMITS.max_cache_len, t.head_dim), np.float32)
    out.update({f"past_{kv}.{i}": cache for i in range(t.num_hidden_layers) for kv in ("key", "value")})
    return out


def ort_logits(path: Path, inputs: dict) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(["logits"], {k: v for k, v in inputs.items() if k in names})[0]


def collectives(path: Path) -> set:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {(n.op_type, a.i) for n in graph.node if n.op_type == "DistCollective" for a in n.attribute
            if a.name == "nb_rank"}


def trt_logits(spec, graph_dir: Path, size: int, inputs: dict, trt, ccs=()) -> np.ndarray:
    """Build every rank's engine with `trt` (full TensorRT; the rehearsal: TensorRT-RTX ahead of time for `ccs`) and
    run one step through trt_tp over `size` GPUs."""
    from qwen_vl_trt.export.build_engines import _contract, build_engine
    from qwen_vl_trt.model.contracts import CONTRACTS
    from qwen_vl_trt.model.tp import TensorParallel
    from qwen_vl_trt.runtime.backends.trt_tp import open_decoder_ranks

    engines, contracts = [], []
    for r in range(size):
        name = f"decoder.rank{r}"
        contract = _contract(name, spec, graph_dir).resolve("float32")
        engines.append(build_engine(trt, graph_dir / f"{name}.onnx", graph_dir / f"{name}.engine", contract, LIMITS,
                                    ccs, log=say))
        contracts.append(contract)
    spans = [TensorParallel(r, size).kv_heads(spec.text.num_key_value_heads) for r in range(size)]
    whole = CONTRACTS["decoder"](spec).resolve("float32")
    session = open_decoder_ranks(engines, contracts, whole, spans, None, dim_ranges(LIMITS), trt=trt)
    say(f"opened {size} rank(s) on devices {session.devices}: NCCL communicators set on every context")
    try:
        return session.run(inputs)["logits"]
    finally:
        session.close()


def compare(label: str, got: np.ndarray, want: np.ndarray) -> bool:
    diff = float(np.abs(got - want).max())
    same = bool((got.argmax(-1) == want.argmax(-1)).all())
    ok = diff <= ATOL and same
    say(f"{label}: logits max |trt - ort| = {diff:.2e} (tol {ATOL}), argmax {'equal' if same else 'DIFFERS'}: "
        f"{'ok' if ok else 'FAILED'}")
    return ok


def gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in r.stdout.splitlines()) if r.returncode == 0 else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--rehearse", action="store_true", help="no GPU expected: stop before the CUDA calls (exit 3)")
    args = ap.parse_args(argv)
    spec, dirs = export(args.work)
    inputs = feeds(spec)
    ws1 = dirs["ws1"] / "decoder.rank0.onnx"
    kept = collectives(ws1)
    layers = spec.text.num_hidden_layers
    say(f"exported: decoder.onnx, world-size-1 rank graph with DistCollective nb_rank {sorted(k[1] for k in kept)} "
        f"({layers} layers), --tp 2 rank graphs")
    if kept != {("DistCollective", 1)}:
        say("FAILED: the world-size-1 graph has no DistCollective nodes with nb_rank=1")
        return 1
    want = ort_logits(dirs["whole"] / "decoder.onnx", inputs)
    if not np.array_equal(ort_logits(ws1, inputs), want):  # Identity bodies: the same graph as decoder.onnx
        say("FAILED: the world-size-1 rank graph differs from decoder.onnx on ONNX Runtime")
        return 1
    say("ONNX Runtime (CPU): the world-size-1 rank graph equals decoder.onnx exactly")
    from qwen_vl_trt.model.errors import UserError
    from qwen_vl_trt.runtime.backends.trt_tp import check_tensorrt

    try:
        import tensorrt as trt
        ccs = ()
    except ImportError:
        if not args.rehearse:
            say("tp1: skipped: no full TensorRT (`import tensorrt` failed; pip install tensorrt-cu13 >= 10.16)")
            return 4
        import tensorrt_rtx as trt  # the rehearsal: parse + build ahead of time, then stop at the CUDA calls
        ccs = ("8.9",)
    try:
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        say("tp1: skipped: no cuda-python (pip install cuda-python)")
        return 3 if args.rehearse else 4
    try:
        check_tensorrt(trt)
    except UserError as e:
        say(f"tp1: skipped: {e}")
        return 4
    gpus = gpu_count()
    say(f"{trt.__name__} {trt.__version__}, {gpus} GPU(s)")
    try:
        ok = compare("tp1 (world size 1, setCommunicator)", trt_logits(spec, dirs["ws1"], 1, inputs, trt, ccs), want)
    except UserError as e:
        say(f"tp1: {'stopped at the CUDA calls' if args.rehearse else 'FAILED'}: {e}")
        return 3 if args.rehearse else 1
    if gpus < 2:
        say("tp2: skipped: 1 GPU")
    else:
        ok = compare("tp2 (2 GPUs, NCCL all-reduce)", trt_logits(spec, dirs["tp2"], 2, inputs, trt), want) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
