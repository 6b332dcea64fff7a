"""Helpers that run the HF reference and our ONNX graphs on the same inputs (tests only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import vision_utils

from qwen_vl_trt.runtime.backends.ort import exact_int4_matmul
from qwen_vl_trt.runtime.serve.parity import hf_greedy as hf_greedy_new_tokens  # noqa: F401 (the one HF greedy reference)


# each graph as TensorRT reads it (plugin nodes; ONNX Runtime runs their reference bodies) and ONNX Runtime's fused one
DECODERS = ("decoder.onnx", "decoder.ort.onnx")
VISIONS = ("vision.onnx", "vision.ort.onnx")


def fp32_graphs(ckpt, out):
    """The three fp32 graphs of `ckpt` exported to `out`."""
    from qwen_vl_trt.export.cli import export_graphs

    export_graphs(ckpt, out, "fp32")
    return out


def hf_model(ckpt, dtype: str = "float32"):
    """HF's model of `ckpt` (the class named by config.json `architectures`) in `dtype`, eval mode."""
    import json

    import transformers

    arch = json.loads((ckpt / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval()


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    exact_int4_matmul(opts)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feeds: dict) -> dict:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def vision_feeds(grid_thw: torch.Tensor, pixel_values: torch.Tensor, vision_config) -> dict:
    """Host-side vision inputs computed with HF's own functions (transformers.vision_utils): Qwen3-VL's
    position-table taps, or Qwen2.5-VL's window index (a config with `window_size`)."""
    merge = vision_config.spatial_merge_size
    feeds = {
        "pixel_values": pixel_values.numpy().astype(np.float32),
        "rotary_pos_ids": vision_utils.get_vision_position_ids(grid_thw, merge).numpy(),
        "cu_seqlens": vision_utils.get_vision_cu_seqlens(grid_thw).numpy().astype(np.int32),
    }
    if hasattr(vision_config, "window_size"):
        index, cu_windows = vision_utils.get_vision_window_index(
            grid_thw, spatial_merge_size=merge, window_size=vision_config.window_size,
            patch_size=vision_config.patch_size)
        return {**feeds, "window_index": index.numpy(), "cu_window_seqlens": cu_windows.numpy().astype(np.int32)}
    idx, wts = vision_utils.get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=int(vision_config.num_position_embeddings**0.5), mode="bilinear",
        align_corners=True, spatial_merge_size=merge)
    return {**feeds, "pos_embed_indices": idx.numpy(), "pos_embed_weights": wts.numpy().astype(np.float32)}


def empty_cache(spec, batch: int, cache_len: int, dtype=np.float32) -> dict:
    t = spec.text
    shape = (batch, t.num_key_value_heads, cache_len, t.head_dim)
    feeds = {}
    for i in range(t.num_hidden_layers):
        feeds[f"past_key.{i}"] = np.zeros(shape, dtype)
        feeds[f"past_value.{i}"] = np.zeros(shape, dtype)
    return feeds


def carry_cache(outputs: dict, n_layers: int) -> dict:
    feeds = {}
    for i in range(n_layers):
        feeds[f"past_key.{i}"] = outputs[f"present_key.{i}"]
        feeds[f"past_value.{i}"] = outputs[f"present_value.{i}"]
    return feeds


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    return ((input_ids == image_token_id).int() + 2 * (input_ids == video_token_id).int())


def text_embed_feeds(spec, input_ids: np.ndarray) -> dict:
    """embed.onnx feeds for a prompt without vision rows (zero rows; zero DeepStack levels when the family has them)."""
    c = spec.text.hidden_size
    feeds = {"input_ids": input_ids, "vision_features": np.zeros((0, c), np.float32)}
    if spec.num_deepstack:
        feeds["deepstack_features"] = np.zeros((spec.num_deepstack, 0, c), np.float32)
    return feeds


def graphs_prefill(graphs: Path, spec, hf, ids: torch.Tensor, grid: torch.Tensor, pixels: torch.Tensor,
                   cache_len: int = 128, decoder: str = "decoder.onnx") -> tuple[dict, torch.Tensor]:
    """Our vision -> embed -> decoder prefill of one image prompt, with HF's MRoPE positions (graph parity in
    isolation) -> (decoder outputs, HF rope_deltas). Any family: DeepStack tensors flow when the graphs have them."""
    vis = run(session(graphs / "vision.onnx"), vision_feeds(grid, pixels, hf.config.vision_config))
    emb = run(session(graphs / "embed.onnx"), {"input_ids": ids.numpy(), **{
        k: vis[k] for k in ("vision_features", "deepstack_features") if k in vis}})
    tt = mm_token_type_ids(ids, spec.image_token_id, spec.video_token_id)
    pos, deltas = hf.model.get_rope_index(ids, tt, image_grid_thw=grid)
    feeds = {**emb, "position_ids": pos.numpy(), "past_lengths": np.zeros(ids.shape[0], np.int64),
             "logits_index": np.full(ids.shape[0], ids.shape[1] - 1, np.int64),
             **empty_cache(spec, ids.shape[0], cache_len)}
    return run(session(graphs / decoder), feeds), deltas


def graphs_decode_feeds(spec, graphs: Path, token: int, outputs: dict, cache_pos: int, rope_delta: int) -> dict:
    """decoder.onnx feeds of one decode step after `outputs` (the previous step's), HF's decode positions."""
    emb = run(session(graphs / "embed.onnx"), text_embed_feeds(spec, np.array([[token]])))
    return {**emb, "position_ids": np.full((3, 1, 1), cache_pos + rope_delta, np.int64),
            "past_lengths": np.array([cache_pos]), "logits_index": np.array([0]),
            **carry_cache(outputs, spec.text.num_hidden_layers)}


def assert_prefill_and_decode_match_hf(hf, graphs: Path, spec, ids: torch.Tensor, grid: torch.Tensor,
                                       pixels: torch.Tensor, steps: int, atol: float,
                                       decoder: str = "decoder.onnx") -> float:
    """Prefill with an image through our three graphs, then `steps` greedy decode steps through the explicit
    cache, each step's logits vs HF's forward with its own cache (same tokens fed to both). Returns max |diff|.
    `decoder`: decoder.onnx, or decoder.ort.onnx (ONNX Runtime's fused flavour of the same graph)."""
    tt = mm_token_type_ids(ids, spec.image_token_id, spec.video_token_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=tt, use_cache=True)
    out, deltas = graphs_prefill(graphs, spec, hf, ids, grid, pixels, decoder=decoder)
    worst = float(np.abs(out["logits"][0] - ref.logits[0, -1].numpy()).max())
    np.testing.assert_allclose(out["logits"][0], ref.logits[0, -1].numpy(), rtol=0, atol=atol)
    cache, pos, dec = ref.past_key_values, ids.shape[1], session(graphs / decoder)
    token, delta = int(ref.logits[0, -1].argmax()), int(deltas[0])
    for _ in range(steps):
        with torch.no_grad():
            step = hf(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                      position_ids=torch.full((3, 1, 1), pos + delta))
        cache = step.past_key_values
        out = run(dec, graphs_decode_feeds(spec, graphs, token, out, pos, delta))
        worst = max(worst, float(np.abs(out["logits"][0] - step.logits[0, -1].numpy()).max()))
        np.testing.assert_allclose(out["logits"][0], step.logits[0, -1].numpy(), rtol=0, atol=atol)
        token, pos = int(step.logits[0, -1].argmax()), pos + 1
    return worst


def prompt_with_pads(spec, n_pads_per_item, text_len: int = 5, seed: int = 0, pad_ids=None) -> torch.Tensor:
    """Token ids [1, S]: text, then <vision_start> pads <vision_end> per item (image pads unless `pad_ids`
    gives each item's pad id), then text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5000, (text_len,), generator=g).tolist()
    for n, pad in zip(n_pads_per_item, pad_ids or [spec.image_token_id] * len(n_pads_per_item)):
        ids += [spec.vision_start_token_id] + [pad] * n + [spec.vision_end_token_id]
    ids += torch.randint(0, 5000, (text_len,), generator=g).tolist()
    return torch.tensor([ids])
