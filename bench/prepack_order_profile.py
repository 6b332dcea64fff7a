"""Does the dense decoder with its largest weights first (runtime/backends/prepack_order.py) run as the exported one?

  python bench/prepack_order_profile.py ARTIFACTS            # kernels and execution order (ONNX Runtime profile)
  python bench/prepack_order_profile.py ARTIFACTS --decode IMG [--rounds 3] [--tokens 24]   # decode tok/s, tokens

The first mode runs one 4-token prefill of decoder.ort.onnx through both sessions with `enable_profiling` and
compares the kernels ONNX Runtime ran, in order, and the outputs (bitwise). The second alternates
load_model(ort_cache=False) (as exported) and load_model() (reordered, from the default cache) in one process and
prints each one's decode tok/s and first tokens. ARTIFACTS must be a writable dense fp32 export whose decoder files
are not symlinks (the reordered graph is cached in ARTIFACTS/.ort-cache by the first load). Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def profile(model, folder: str | None, rng) -> tuple[list, list]:
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level, o.intra_op_num_threads, o.enable_profiling = 3, 2, True
    if folder:
        o.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    s = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
    seq, cache = 4, 16
    feeds = {}
    for i in s.get_inputs():
        if i.name == "inputs_embeds":
            feeds[i.name] = rng.standard_normal((1, seq, i.shape[2])).astype(np.float32)
        elif i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(seq), (3, 1, seq)).astype(np.int64).copy()
        elif i.name == "past_lengths":
            feeds[i.name] = np.zeros(1, np.int64)
        elif i.name == "logits_index":
            feeds[i.name] = np.array([seq - 1], np.int64)
        elif i.name == "deepstack_embeds":
            feeds[i.name] = np.zeros((i.shape[0], 1, seq, i.shape[3]), np.float32)
        elif i.name.startswith("past_"):
            feeds[i.name] = np.zeros((1, i.shape[1], cache, i.shape[3]), np.float32)
    out = s.run(None, feeds)
    path = s.end_profiling()
    events = json.loads(Path(path).read_text())
    os.remove(path)
    kernels = [e["name"].removesuffix("_kernel_time") for e in events
               if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return kernels, out


def order(art: Path) -> None:
    from qwen_vl_trt.runtime.generate import load_model

    load_model(art, "onnxruntime")  # writes the reordered graph into the default cache when it is not there
    graph = next((art / ".ort-cache").glob("decoder.ort.onnx-*/graph.pb"))
    a, out_a = profile(str(art / "decoder.ort.onnx"), None, np.random.default_rng(0))
    b, out_b = profile(graph.read_bytes(), str(art), np.random.default_rng(0))
    print(f"kernels run: {len(a)} exported, {len(b)} reordered; same order: {a == b}")
    print("outputs bitwise equal:", all(np.array_equal(x, y) for x, y in zip(out_a, out_b)))


def decode(art: Path, image: str, rounds: int, tokens: int) -> None:
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    for _ in range(rounds):
        for name, kw in (("exported", {"ort_cache": False}), ("reordered", {})):
            m = load_model(art, "onnxruntime", threads=2, **kw)
            req = Preprocessor(m.manifest).prepare(Request("Describe this image.", (image,)))
            r = generate(m, [req], Sampler(SamplingConfig(temperature=0)), tokens, ignore_eos=True)[0]
            print(f"{name}: decode {r.timings['decode_tok_per_s']} tok/s, tokens {r.token_ids[:8]}, "
                  f"load {open('/proc/loadavg').read().split()[0]}", flush=True)
            del m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--decode", metavar="IMAGE")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    if args.decode:
        decode(args.artifacts, args.decode, args.rounds, args.tokens)
    else:
        order(args.artifacts)


if __name__ == "__main__":
    main()
