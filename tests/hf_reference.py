"""Helpers that run the HF reference and our ONNX graphs on the same inputs (tests only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import vision_utils


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feeds: dict) -> dict:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def vision_feeds(grid_thw: torch.Tensor, pixel_values: torch.Tensor, vision_config) -> dict:
    """Host-side vision inputs computed with HF's own functions (transformers.vision_utils)."""
    merge = vision_config.spatial_merge_size
    idx, wts = vision_utils.get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=int(vision_config.num_position_embeddings**0.5), mode="bilinear",
        align_corners=True, spatial_merge_size=merge)
    return {
        "pixel_values": pixel_values.numpy().astype(np.float32),
        "pos_embed_indices": idx.numpy(),
        "pos_embed_weights": wts.numpy().astype(np.float32),
        "rotary_pos_ids": vision_utils.get_vision_position_ids(grid_thw, merge).numpy(),
        "cu_seqlens": vision_utils.get_vision_cu_seqlens(grid_thw).numpy().astype(np.int32),
    }


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
