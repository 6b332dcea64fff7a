"""`qwen-vl-parity CHECKPOINT ARTIFACTS --image x.png`: our exported graphs vs HF transformers, layer by layer.

For one real request (images / video / prompt through the runtime's own preprocessing, which the tests hold
bit-exact to HF's processor), it runs HF's model once with forward hooks on every vision block and every
decoder layer, and our graphs on ONNX Runtime with the same layers exposed as extra outputs, then prints one
row per compared tensor and the greedy tokens of both:

    tensor                          shape        max|ours-hf|   max|hf|    rel      ok
    visual/blocks.0                 [560, 1152]  3.1e-06        1.2e+01    2.6e-07  yes
    ...
    text/layers.35                  [1, 312, 4096] ...
    logits[last]                    [151936]     ...
    greedy tokens (32)              first divergence: none                          yes

`rel` = max|ours-hf| / max|hf|; a row fails above --rtol (default 1e-3 for fp32 artifacts, 5e-2 for
bf16/fp16, where HF also runs in that dtype). The first failing layer is where to look. Exit 0 when every
row passes, 1 when one fails, 2 on bad input. Needs the `export` extra (torch, transformers); the graphs run
on ONNX Runtime's CPU provider unless --provider says otherwise (bf16 graphs need CUDA).

Layers are found by the graph's node names, which follow HF's module paths (export/onnx_graph.py): a layer's output is
the last node of its `/visual/blocks.i/mlp/` or `/text/layers.i/mlp/` scope (the residual Add), the same
tensor a forward hook on HF's `visual.blocks[i]` / `language_model.layers[i]` returns (before DeepStack).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_RTOL = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 5e-2}


@dataclass
class Row:
    name: str
    shape: tuple
    max_abs: float
    max_ref: float
    rtol: float

    @property
    def rel(self) -> float:
        return self.max_abs / max(self.max_ref, 1e-30)

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.rel <= self.rtol


def compare(name: str, ours: np.ndarray, ref: np.ndarray, rtol: float) -> Row:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    if ours.shape != ref.shape:
        return Row(f"{name} (shape {list(ours.shape)} vs HF {list(ref.shape)})", ref.shape, float("inf"), 1.0, rtol)
    return Row(name, ref.shape, float(np.abs(ours - ref).max(initial=0.0)), float(np.abs(ref).max(initial=0.0)), rtol)


# ---- our side: graphs with layer outputs exposed ---------------------------------------------------------
def layer_outputs(model, scope_prefix: str) -> dict[int, str]:
    """{i: value name} of the last node in each `<scope_prefix>.<i>/mlp/` scope (the layer's residual Add)."""
    found: dict[int, str] = {}
    for node in model.graph.node:
        if not node.name.startswith(scope_prefix + "."):
            continue
        index, _, rest = node.name[len(scope_prefix) + 1:].partition("/")
        if index.isdigit() and rest.startswith("mlp/"):
            found[int(index)] = node.output[0]  # nodes are in emission order: the last one wins
    return found


def session_with_layers(graph: Path, scope_prefix: str, elem_type: int, provider: str):
    """An ORT session of `graph` that also returns its layer outputs; (session, {i: output name}).
    The edited model is passed as bytes; its external data is read from the graph's own directory."""
    import onnx
    import onnxruntime as ort

    from ..backends.ort import exact_int4_matmul

    model = onnx.load(str(graph), load_external_data=False)
    names = layer_outputs(model, scope_prefix)
    for name in names.values():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    opts = ort.SessionOptions()
    exact_int4_matmul(opts)
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.parent.resolve()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=[provider]), names


def run_session(sess, feeds: dict) -> dict:
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(None, {k: v for k, v in feeds.items() if k in wanted})))


# ---- HF side -------------------------------------------------------------------------------------------
def hf_inputs(prepared, spec, n_images: int):
    """HF forward kwargs for one prepared request (its media: the images, then the video, prompt order)."""
    import torch

    ids = torch.from_numpy(prepared.input_ids[None].astype(np.int64))
    kw = {"input_ids": ids, "mm_token_type_ids": ((ids == spec.image_token_id).int()
                                                  + 2 * (ids == spec.video_token_id).int())}
    for key, items in (("image", prepared.media[:n_images]), ("video", prepared.media[n_images:])):
        if items:
            kw["pixel_values" if key == "image" else "pixel_values_videos"] = torch.from_numpy(
                np.concatenate([m.pixel_values for m in items]))
            kw[f"{key}_grid_thw"] = torch.tensor([list(m.grid_thw) for m in items])
    return kw


def run_hf(hf, kwargs: dict, dtype) -> tuple[dict, np.ndarray]:
    """One HF forward with hooks -> ({'visual/blocks.i' | 'text/layers.i': np.ndarray}, last logits [V])."""
    import torch

    captured: dict[str, list] = {}

    def hook(name):
        def fn(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            captured.setdefault(name, []).append(out.detach().float().numpy())
        return fn

    def merged_hook(_module, _inputs, output):  # 5.x: pooler_output [M, C] (+ deepstack_features, Qwen3-VL)
        captured.setdefault("visual/merged", []).append(output.pooler_output.detach().float().numpy())
        for level, feat in enumerate(getattr(output, "deepstack_features", None) or ()):
            captured.setdefault(f"visual/deepstack.{level}", []).append(feat.detach().float().numpy())

    inner = hf.model
    handles = [inner.visual.register_forward_hook(merged_hook)]
    handles += [blk.register_forward_hook(hook(f"visual/blocks.{i}")) for i, blk in enumerate(inner.visual.blocks)]
    handles += [lyr.register_forward_hook(hook(f"text/layers.{i}")) for i, lyr in enumerate(inner.language_model.layers)]
    kwargs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kwargs.items()}
    try:
        with torch.no_grad():
            out = hf(**kwargs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    # vision blocks run once per vision call (images, then videos): concatenate along tokens
    acts = {k: np.concatenate(v, axis=0) if k.startswith("visual") else v[0] for k, v in captured.items()}
    return acts, out.logits[0, -1].float().numpy()


def hf_greedy(hf, kwargs: dict, n: int, dtype=None, stop_at_eos: bool = False) -> list[int]:
    """The HF greedy reference (this tool's and the tests'): `generate` of up to `n` new tokens of the first
    sequence of `kwargs` (HF processor output; float tensors cast to `dtype` when given). EOS is disabled unless
    `stop_at_eos` (then the checkpoint's); the rest of the checkpoint's generation_config applies (e.g. its
    repetition penalty). pad_token_id: the checkpoint's, else its first EOS (model/manifest.py's rule); one
    sequence never reads it."""
    import torch
    from transformers import GenerationConfig

    if dtype is not None:
        kwargs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kwargs.items()}
    own = hf.generation_config
    eos = own.eos_token_id if stop_at_eos else None
    first_eos = own.eos_token_id[0] if isinstance(own.eos_token_id, list) else own.eos_token_id
    pad = own.pad_token_id if own.pad_token_id is not None else (first_eos if first_eos is not None else 0)
    gen = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
    saved, own.eos_token_id = own.eos_token_id, eos
    try:
        with torch.no_grad():
            out = hf.generate(**kwargs, generation_config=gen)
    finally:
        own.eos_token_id = saved
    return out[0, kwargs["input_ids"].shape[1]:].tolist()


# ---- the comparison ------------------------------------------------------------------------------------
def parity(checkpoint, artifacts, request, n_tokens: int = 16, rtol: float | None = None,
           provider: str = "CPUExecutionProvider") -> tuple[list[Row], list[int], list[int]]:
    """Rows of per-layer comparisons, our greedy tokens, HF's greedy tokens."""
    import onnx
    import torch
    import transformers

    from qwen_vl_trt.model.errors import UserError

    from ..generate import embed, generate, load_model
    from ..backends.kv_cache import numpy_dtype
    from ..pipeline import Preprocessor, vision_feeds
    from ..sampling import Sampler, SamplingConfig

    model = load_model(artifacts, "onnxruntime")
    manifest, spec = model.manifest, model.manifest.spec
    dtype = manifest.dtype
    rtol = DEFAULT_RTOL[dtype] if rtol is None else rtol
    prepared = Preprocessor(manifest).prepare(request)
    if spec.family.video_seconds_per_grid and request.video is not None:
        raise UserError("qwen-vl-parity: Qwen2.5-VL video is not supported yet (HF needs second_per_grid_ts); "
                        "compare with images")
    torch_dtype = getattr(torch, dtype)
    arch = json.loads((Path(checkpoint) / "config.json").read_text())["architectures"][0]
    hf = getattr(transformers, arch).from_pretrained(str(checkpoint), dtype=torch_dtype).eval()
    kwargs = hf_inputs(prepared, spec, len(request.images))
    hf_acts, hf_logits = run_hf(hf, kwargs, torch_dtype)

    rows: list[Row] = []
    elem = getattr(onnx.TensorProto, {"float32": "FLOAT", "float16": "FLOAT16", "bfloat16": "BFLOAT16"}[dtype])
    art = Path(artifacts)
    features = deepstack = None
    if prepared.media:
        vis, vis_layers = session_with_layers(art / "vision.onnx", "/visual/blocks", elem, provider)
        outs = []
        for m in prepared.media:  # one vision call per media item, as HF runs images and videos apart
            outs.append(run_session(vis, vision_feeds(spec, m.pixel_values, np.array([m.grid_thw]))))
        for i, name in sorted(vis_layers.items()):
            ours = np.concatenate([o[name] for o in outs])
            rows.append(compare(f"visual/blocks.{i}", ours, hf_acts[f"visual/blocks.{i}"], rtol))
        features = np.concatenate([o["vision_features"] for o in outs])
        rows.append(compare("visual/merged", features, hf_acts["visual/merged"], rtol))
        if "deepstack_features" in outs[0]:
            deepstack = np.concatenate([o["deepstack_features"] for o in outs], axis=1)
            for level in range(deepstack.shape[0]):
                rows.append(compare(f"visual/deepstack.{level}", deepstack[level],
                                    hf_acts[f"visual/deepstack.{level}"], rtol))
    dec, dec_layers = session_with_layers(art / "decoder.onnx", "/text/layers", elem, provider)
    c = spec.text.hidden_size
    if features is None:
        features = np.zeros((0, c), numpy_dtype(dtype))
        deepstack = np.zeros((spec.num_deepstack, 0, c), numpy_dtype(dtype)) if spec.num_deepstack else None
    emb = embed(model, prepared.input_ids[None], features, deepstack)
    s, t = len(prepared.input_ids), spec.text
    cache = np.zeros((1, t.num_key_value_heads, s, t.head_dim), numpy_dtype(dtype))
    feeds = {**emb, "position_ids": prepared.position_ids[:, None], "past_lengths": np.zeros(1, np.int64),
             "logits_index": np.array([s - 1], np.int64)}
    for i in range(t.num_hidden_layers):
        feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = cache
    out = run_session(dec, feeds)
    for i, name in sorted(dec_layers.items()):
        rows.append(compare(f"text/layers.{i}", out[name], hf_acts[f"text/layers.{i}"], rtol))
    rows.append(compare("logits[last]", out["logits"][0], hf_logits, rtol))

    # greedy, with generation_config.json's repetition penalty: HF generate applies it when greedy too
    greedy = SamplingConfig.from_generation_config(model.manifest.generation_config, temperature=0.0)
    ours = generate(model, [prepared], Sampler(greedy), n_tokens, ignore_eos=True)[0].token_ids
    theirs = hf_greedy(hf, kwargs, n_tokens, torch_dtype)
    return rows, ours, theirs


def report(rows: list[Row], ours: list[int], theirs: list[int], out=None) -> bool:
    out = out or sys.stdout
    width = max(len(r.name) for r in rows) + 2
    out.write(f"{'tensor':<{width}}{'shape':<18}{'max|ours-hf|':>13}{'max|hf|':>11}{'rel':>10}  ok\n")
    for r in rows:
        shape = "[" + ", ".join(map(str, r.shape)) + "]"
        out.write(f"{r.name:<{width}}{shape:<18}{r.max_abs:>13.3e}{r.max_ref:>11.3e}{r.rel:>10.2e}  "
                  f"{'yes' if r.ok else 'NO'}\n")
    diverge = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    same = diverge is None and len(ours) == len(theirs)
    out.write(f"greedy tokens ({len(theirs)}): first divergence: {'none' if same else f'token {diverge}'}  "
              f"{'yes' if same else 'NO'}\n")
    bad = [r.name for r in rows if not r.ok]
    if bad:
        out.write(f"first tensor out of tolerance: {bad[0]} (rtol {rows[0].rtol:g})\n")
    return same and not bad


def main(argv=None) -> int:
    from qwen_vl_trt.model.errors import UserError

    from ..request import Request

    ap = argparse.ArgumentParser(prog="qwen-vl-parity", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="the Hugging Face checkpoint the artifacts were exported from")
    ap.add_argument("artifacts", help="artifact directory from export_all.sh")
    ap.add_argument("--image", action="append", default=[])
    ap.add_argument("--video")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare (EOS ignored)")
    ap.add_argument("--rtol", type=float, default=None, help="max |ours-hf| / max |hf| per tensor")
    ap.add_argument("--provider", default="CPUExecutionProvider", help="ONNX Runtime provider for our graphs")
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    prompt = args.prompt or ("Describe this image." if args.image or args.video else None)
    if prompt is None:
        print("error: nothing to compare: pass --prompt TEXT, --image PATH or --video PATH", file=sys.stderr)
        return 2
    if not (Path(args.checkpoint) / "config.json").is_file():
        print(f"error: {args.checkpoint}: not a checkpoint directory (no config.json)", file=sys.stderr)
        return 2
    try:
        rows, ours, theirs = parity(args.checkpoint, args.artifacts, Request(prompt, tuple(args.image), args.video),
                                    args.tokens, args.rtol, args.provider)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if report(rows, ours, theirs) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
