"""Measurements for bench/bench_pipeline.py: our pipeline (ONNX Runtime, bound decode step) and HF transformers on
the same prepared request, same weights, same device, same process. Each function returns plain numbers in a dict.

Timing: ONNX Runtime's Run returns when the device work is done (it synchronizes the EP's stream), so host clocks
around our calls measure device latency; the HF side synchronizes CUDA around every timed region, and per-token
decode times come from a LogitsProcessor that synchronizes and stamps each step (one step = one decoder forward).
"""
from __future__ import annotations

import gc
import time

import numpy as np

from benchlib import OrtCalls

VISION_OUT = ("vision_features", "deepstack_features")


def _median(xs) -> float:
    return float(np.median(xs))


class Device:
    """What the bench runs on: "cuda" (torch synchronize / memory) or "cpu" (no-ops)."""

    def __init__(self, kind: str):
        import torch

        self.kind, self.torch = kind, torch

    def sync(self) -> None:
        if self.kind == "cuda":
            self.torch.cuda.synchronize()

    def used_gib(self) -> float | None:
        """Device memory in use by everything (this process: torch, ONNX Runtime), GiB."""
        if self.kind != "cuda":
            return None
        free, total = self.torch.cuda.mem_get_info()
        return (total - free) / 2**30

    def copy_gbps(self, nbytes: int = 1 << 30, reps: int = 20) -> float:
        """Device-to-device (host memcpy on the CPU) copy bandwidth, bytes read + written per second."""
        torch = self.torch
        if self.kind != "cuda":
            src = np.ones(nbytes // 4, np.uint8)
            dst = np.empty_like(src)
            np.copyto(dst, src)
            t0 = time.perf_counter()
            for _ in range(3):
                np.copyto(dst, src)
            return 2 * src.nbytes * 3 / (time.perf_counter() - t0) / 1e9
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        sec = start.elapsed_time(end) / 1e3 / reps
        del src, dst
        torch.cuda.empty_cache()
        return 2 * nbytes / sec / 1e9


# ---- ours --------------------------------------------------------------------------------------------------
def ours(art, requests: dict, ttft_request, batches, tokens: int, reps: int, check_tokens: int,
         device: Device, with_no_graph: bool = True, with_plugin_graphs: bool = True) -> dict:
    """`requests`: size -> PreparedRequest with one image of that size; `ttft_request`: the 448 + 50 tokens one."""
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import vision_feeds
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    base = device.used_gib()
    t0 = time.perf_counter()
    model = load_model(art, "onnxruntime")
    out = {"load_s": time.perf_counter() - t0, "vision_ms": {}, "decode": {}}
    dec = model.sessions["decoder"]
    out["provider"] = dec.sess.get_providers()[0]
    out["cuda_graph"] = dec.graph_capture
    out["cuda_graph_error"] = dec.graph_capture_error
    spec = model.spec
    for size, req in requests.items():
        m = req.media[0]
        feeds = vision_feeds(spec, m.pixel_values, np.asarray([m.grid_thw]))
        for _ in range(2):
            model.sessions["vision"].run(feeds, device_outputs=VISION_OUT)
        times = []
        for _ in range(reps):
            a = time.perf_counter()
            model.sessions["vision"].run(feeds, device_outputs=VISION_OUT)
            times.append(time.perf_counter() - a)
        out["vision_ms"][size] = 1e3 * _median(times)
    greedy = Sampler(SamplingConfig(temperature=0))
    for batch in batches:
        reqs = [ttft_request] * batch
        generate(model, reqs, greedy, tokens, ignore_eos=True)  # warm-up: allocations, CUDA graph capture
        rows = []
        for _ in range(reps):
            with OrtCalls() as calls:
                res = generate(model, reqs, greedy, tokens, ignore_eos=True)
            t = res[0].timings
            n = t["decode_tokens"]
            in_ort = sum(c[2] for c in calls.after_first_call_of(dec.sess))
            rows.append({"ttft_ms": t["ttft_ms"], "vision_ms": t["vision_ms"], "prefill_ms": t["prefill_ms"],
                         "token_ms": t["decode_ms"] / n, "host_ms": (t["decode_ms"] - 1e3 * in_ort) / n})
        out["decode"][batch] = {k: _median([r[k] for r in rows]) for k in rows[0]}
        out["decode"][batch]["tok_s"] = batch * 1e3 / out["decode"][batch]["token_ms"]
    out["preprocess_ms"] = ttft_request.timings.get("preprocess_ms")
    res = generate(model, [ttft_request], greedy, check_tokens, ignore_eos=True)
    out["tokens"] = res[0].token_ids
    generate(model, [ttft_request], greedy, 1, ignore_eos=True)
    io = next(iter(model.static.values()))
    out["first_logits"] = np.asarray(io.logits.numpy(), np.float32)[0].copy()  # the prefill's logits
    out["peak_gib"] = None if base is None else device.used_gib() - base
    graph = dec.graph_capture
    del model, io, dec
    gc.collect()
    if graph and with_no_graph:  # the same step without CUDA graph replay: what the graph is worth
        model = load_model(art, "onnxruntime", cuda_graph=False)
        generate(model, [ttft_request], greedy, tokens, ignore_eos=True)
        t = generate(model, [ttft_request], greedy, tokens, ignore_eos=True)[0].timings
        out["no_graph_tok_s"] = t["decode_tokens"] / t["decode_ms"] * 1e3
        del model
        gc.collect()
    if with_plugin_graphs:  # the graphs TensorRT builds, their reference bodies on ONNX Runtime: what *.ort.onnx is worth
        model = load_model(art, "onnxruntime", ort_fused=False)
        size = max(requests)
        m = requests[size].media[0]
        feeds = vision_feeds(spec, m.pixel_values, np.asarray([m.grid_thw]))
        model.sessions["vision"].run(feeds, device_outputs=VISION_OUT)
        a = time.perf_counter()
        model.sessions["vision"].run(feeds, device_outputs=VISION_OUT)
        out["plugin_graphs"] = {"vision_size": size, "vision_ms": 1e3 * (time.perf_counter() - a)}
        generate(model, [ttft_request], greedy, tokens, ignore_eos=True)
        t = generate(model, [ttft_request], greedy, tokens, ignore_eos=True)[0].timings
        out["plugin_graphs"]["tok_s"] = t["decode_tokens"] / t["decode_ms"] * 1e3
        del model
        gc.collect()
    return out


# ---- Hugging Face ------------------------------------------------------------------------------------------
class StepTimer:
    """A LogitsProcessor that synchronizes and stamps each generation step (called once per new token)."""

    def __init__(self, device: Device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        self.device.sync()
        self.times.append(time.perf_counter())
        return scores


def hf_inputs(model, req, batch: int, device: str, dtype):
    """HF forward kwargs for `batch` copies of a prepared request (images only), on `device`. `mm_token_type_ids`
    where this transformers version takes it (5.2x requires it with images; older ones derive it)."""
    import inspect

    import torch

    ids = torch.from_numpy(np.repeat(req.input_ids[None].astype(np.int64), batch, axis=0))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kw["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    if req.media:
        kw["pixel_values"] = torch.from_numpy(np.concatenate([m.pixel_values for m in req.media] * batch))
        kw["image_grid_thw"] = torch.tensor([list(m.grid_thw) for m in req.media] * batch)
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in kw.items()}


def hf_generate(hf, kwargs: dict, n: int, device: Device, compiled: bool) -> tuple[list, StepTimer, float]:
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0,
                           cache_implementation="static" if compiled else None, disable_compile=not compiled)
    timer = StepTimer(device)
    saved, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None
    try:
        device.sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(**kwargs, generation_config=gen, logits_processor=LogitsProcessorList([timer]))
        device.sync()
    finally:
        hf.generation_config.eos_token_id = saved
    return out[:, kwargs["input_ids"].shape[1]:].tolist(), timer, t0


def hf(ckpt, requests: dict, ttft_request, batches, tokens: int, reps: int, check_tokens: int, device: Device,
       modes, dtype_name: str, attn: str, budget) -> dict:
    """`modes`: ("dynamic",) and/or ("compiled",) -- HF's default dynamic cache, or a static cache with
    transformers' own torch.compile of the decode step (generate's auto-compile)."""
    import json

    import torch
    import transformers

    dtype = getattr(torch, dtype_name)
    base = device.used_gib()
    if device.kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    arch = json.loads((ckpt / "config.json").read_text())["architectures"][0]
    t0 = time.perf_counter()
    kwargs = {"device_map": "cuda"} if device.kind == "cuda" else {}  # straight onto the GPU
    model = getattr(transformers, arch).from_pretrained(str(ckpt), dtype=dtype, attn_implementation=attn, **kwargs)
    model = model.to(device.kind).eval()
    out = {"load_s": time.perf_counter() - t0, "vision_ms": {}, "decode": {}}
    for size, req in requests.items():
        kw = hf_inputs(model, req, 1, device.kind, dtype)
        with torch.no_grad():
            for _ in range(2):
                model.model.visual(kw["pixel_values"], grid_thw=kw["image_grid_thw"])
            times = []
            for _ in range(reps):
                device.sync()
                a = time.perf_counter()
                model.model.visual(kw["pixel_values"], grid_thw=kw["image_grid_thw"])
                device.sync()
                times.append(time.perf_counter() - a)
        out["vision_ms"][size] = 1e3 * _median(times)
    expected = {"dynamic": 20.0, "compiled": 120.0}  # seconds; updated from what the previous run took
    for mode in modes:
        out["decode"][mode] = {}
        for batch in batches:
            if not budget.allows(expected[mode]):
                out["decode"][mode][batch] = {"skipped": "time budget"}
                continue
            kw = hf_inputs(model, ttft_request, batch, device.kind, dtype)
            a = time.perf_counter()
            hf_generate(model, kw, tokens, device, mode == "compiled")  # warm-up (compiles the static path)
            warm_s = time.perf_counter() - a
            rows = []
            for _ in range(reps):
                _, timer, start = hf_generate(model, kw, tokens, device, mode == "compiled")
                steps = np.diff(timer.times)
                rows.append({"ttft_ms": 1e3 * (timer.times[0] - start), "token_ms": 1e3 * float(np.mean(steps))})
            row = {k: _median([r[k] for r in rows]) for k in rows[0]}
            row.update(tok_s=batch * 1e3 / row["token_ms"], warmup_s=warm_s)
            out["decode"][mode][batch] = row
            expected[mode] = 1.2 * (time.perf_counter() - a)
    kw = hf_inputs(model, ttft_request, 1, device.kind, dtype)
    out["tokens"] = hf_generate(model, kw, check_tokens, device, False)[0][0]
    with torch.no_grad():
        out["first_logits"] = model(**kw).logits[0, -1].float().cpu().numpy()
    out["peak_gib"] = None if base is None else device.used_gib() - base
    out["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.kind == "cuda" else None
    del model
    gc.collect()
    if device.kind == "cuda":
        torch.cuda.empty_cache()
    return out
