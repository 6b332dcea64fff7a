"""Greedy next-token choice on the EP's device: only the sampled token ids cross to the host.

A tiny ONNX graph, built here and run by ONNX Runtime on the decoder's provider, with HF semantics identical to
`sampling.Sampler` in greedy mode (the tests compare the two on the CPU EP):

    logits f32 [B, V] --(seen bool [B, V]: HF repetition penalty, only when penalty != 1)--> ArgMax -> tokens int64 [B]
    seen_next = seen with seen[b, tokens[b]] = True   (ScatterElements; the next step's `seen`)

The penalty is `where(seen, where(l < 0, l * p, l / p), l)` in float32 (`RepetitionPenaltyLogitsProcessor`);
ArgMax takes the first index on ties (`select_last_index=0`, as numpy / torch argmax). All buffers are bound
once (two bindings swap `seen` / `seen_next`), so a step is one `run_with_iobinding` plus an 8-byte-per-row copy
of the tokens to the host. Sampling with temperature / top-k / top-p stays on the host (`sampling.Sampler`, its
seeded numpy generator defines the random stream).
"""
from __future__ import annotations

import numpy as np

_OPSET = 18


def greedy_model(penalty: float):
    """The ONNX model: inputs `logits` (+ `seen`), outputs `tokens` (+ `seen_next`)."""
    from onnx import TensorProto as TP
    from onnx import helper

    b, v = "batch", "vocab"
    inputs = [helper.make_tensor_value_info("logits", TP.FLOAT, [b, v])]
    outputs = [helper.make_tensor_value_info("tokens", TP.INT64, [b])]
    inits, nodes, scores = [], [], "logits"
    if penalty != 1.0:
        inputs.append(helper.make_tensor_value_info("seen", TP.BOOL, [b, v]))
        outputs.append(helper.make_tensor_value_info("seen_next", TP.BOOL, [b, v]))
        inits += [helper.make_tensor("p", TP.FLOAT, [], [penalty]), helper.make_tensor("zero", TP.FLOAT, [], [0.0]),
                  helper.make_tensor("axis1", TP.INT64, [1], [1]), helper.make_tensor("true", TP.BOOL, [], [True])]
        nodes += [helper.make_node("Less", ["logits", "zero"], ["neg"]),
                  helper.make_node("Mul", ["logits", "p"], ["times_p"]),
                  helper.make_node("Div", ["logits", "p"], ["over_p"]),
                  helper.make_node("Where", ["neg", "times_p", "over_p"], ["penalized"]),
                  helper.make_node("Where", ["seen", "penalized", "logits"], ["scores"])]
        scores = "scores"
    nodes.append(helper.make_node("ArgMax", [scores], ["tokens"], axis=1, keepdims=0, select_last_index=0))
    if penalty != 1.0:
        nodes += [helper.make_node("Unsqueeze", ["tokens", "axis1"], ["tokens_b1"]),  # [B, 1]
                  helper.make_node("Shape", ["tokens_b1"], ["shape_b1"]),
                  helper.make_node("Expand", ["true", "shape_b1"], ["ones_b1"]),
                  helper.make_node("ScatterElements", ["seen", "tokens_b1", "ones_b1"], ["seen_next"], axis=1)]
    graph = helper.make_graph(nodes, "greedy", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])


class DeviceGreedy:
    """Greedy choice over bound logits [B, V] on `device` (an OrtValue, or a (pointer, shape) of float32 device
    memory); `start(seen)` once per generation, then `sample() -> int64 [B]` (host) per step."""

    def __init__(self, ort, providers, logits, batch: int, vocab: int, penalty: float, device: str):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1  # a few small kernels: no thread pool spinning beside the decoder's
        self.ort, self.device = ort, device
        self.sess = ort.InferenceSession(greedy_model(penalty).SerializeToString(), opts, providers=list(providers))
        self.tokens = ort.OrtValue.ortvalue_from_numpy(np.zeros(batch, np.int64), device, 0)
        self.penalty = penalty
        self.current = 0
        if penalty == 1.0:
            self.bindings = [self._bind(logits, None, None)]
            return
        self.seen = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, vocab), bool), device, 0) for _ in range(2)]
        self.bindings = [self._bind(logits, self.seen[p], self.seen[1 - p]) for p in (0, 1)]

    def _bind(self, logits, seen, seen_next):
        b = self.sess.io_binding()
        if isinstance(logits, tuple):  # (device pointer, shape): another runtime's buffer (TensorRT's logits)
            ptr, shape = logits
            b.bind_input("logits", self.device, 0, np.float32, list(shape), ptr)
        else:
            b.bind_ortvalue_input("logits", logits)
        b.bind_ortvalue_output("tokens", self.tokens)
        if seen is not None:
            b.bind_ortvalue_input("seen", seen)
            b.bind_ortvalue_output("seen_next", seen_next)
        return b

    def start(self, seen: np.ndarray | None) -> None:
        """A new generation: `seen` bool [B, V] of the prompts (Sampler.start), needed when a penalty is set."""
        self.current = 0
        if self.penalty != 1.0:
            self.seen[0].update_inplace(np.ascontiguousarray(seen, bool))

    def sample(self) -> np.ndarray:
        self.sess.run_with_iobinding(self.bindings[self.current])
        if self.penalty != 1.0:
            self.current = 1 - self.current
        return self.tokens.numpy().copy()  # a CPU OrtValue's numpy() shares its memory: copy before the next step


def greedy_on_cuda_logits(ptr: int, shape: tuple, penalty: float) -> "DeviceGreedy | None":
    """A DeviceGreedy over float32 logits [B, V] at device pointer `ptr` (another runtime's buffer: TensorRT's),
    run by onnxruntime-gpu; None without onnxruntime-gpu."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    batch, vocab = shape
    return DeviceGreedy(ort, ["CUDAExecutionProvider"], (ptr, shape), batch, vocab, penalty, "cuda")
