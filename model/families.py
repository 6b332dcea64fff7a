"""The model families: one `Family` record per config.json `model_type`, read by export and runtime alike.

Everything that differs between Qwen3-VL (dense and MoE) and Qwen2.5-VL is named here, and nowhere else is the
model type tested. Behaviour that lives in export/ or runtime/ is named by an entry-point reference,
"module:function" (the form of pyproject.toml's console scripts), and imported when first used: this package
imports neither export nor runtime, and export and runtime never import each other.

| field | read by | what it is |
|---|---|---|
| `config_parser` | model/spec.py | config.json -> ModelSpec |
| `vision_inputs` | model/contracts.py | vision.onnx inputs beside pixel_values / rotary_pos_ids / cu_seqlens |
| `vision_exporter` | export/cli.py | (spec, weights, out_dir, dtype) -> vision.onnx |
| `vision_feeds` | runtime/pipeline.py | (spec, grids int [n, 3]) -> host arrays of `vision_inputs` |
| `rope_index` | runtime/pipeline.py | (spec, input_ids [1, S], mm types [1, S], image grids, video grids, video) -> (positions [3, 1, S], rope delta [1]) |
| `video_preprocess` | runtime/pipeline.py | (path, VideoProcessorConfig) -> VideoInputs |
| `video_prompt` | runtime/prompt.py | (rendered text, video grids, timestamps, merge) -> (text, one expansion per video) |
| `video_seconds_per_grid` | runtime/serve/request_file.py, runtime/serve/parity.py | video MRoPE time steps come from `second_per_grid_ts` (HF takes it as an input) |

A new family: one row here, its config parser in model/spec.py, and the functions its row names
(docs/architecture.md lists the files).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

from .contracts import TensorSpec
from .errors import CheckpointError


@dataclass(frozen=True)
class Family:
    model_type: str
    config_parser: str
    vision_inputs: tuple[TensorSpec, ...]
    vision_exporter: str
    vision_feeds: str
    rope_index: str
    video_preprocess: str
    video_prompt: str
    video_seconds_per_grid: bool = False

    def load(self, role: str):
        """The function named by field `role` (e.g. "vision_feeds"), imported on first use."""
        return _resolve(getattr(self, role))


@cache
def _resolve(reference: str):
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


_POS_EMBED = (TensorSpec("pos_embed_indices", "int64", ("num_patches", 4),
                         "bilinear taps into the learned position table, merge-block order"),
              TensorSpec("pos_embed_weights", "float32", ("num_patches", 4), "bilinear tap weights"))
_WINDOWS = (TensorSpec("window_index", "int64", ("num_merged",),
                       "merged-token permutation into window order (HF get_window_index)"),
            TensorSpec("cu_window_seqlens", "int32", ("num_windows_1",),
                       "cumulative patch counts of the attention windows (window order)"))

_QWEN3_VL = dict(
    vision_inputs=_POS_EMBED,
    vision_exporter="qwen_vl_trt.export.vision:export_vision",
    vision_feeds="qwen_vl_trt.runtime.vision_inputs:qwen3_vl_feeds",
    rope_index="qwen_vl_trt.runtime.positions:qwen3_vl_prompt_positions",
    video_preprocess="qwen_vl_trt.runtime.video:preprocess_video_qwen3",
    video_prompt="qwen_vl_trt.runtime.prompt:qwen3_video_prompt",
)

FAMILIES = {f.model_type: f for f in (
    Family("qwen3_vl", config_parser="qwen_vl_trt.model.spec:parse_qwen3_vl", **_QWEN3_VL),
    Family("qwen3_vl_moe", config_parser="qwen_vl_trt.model.spec:parse_qwen3_vl_moe", **_QWEN3_VL),
    Family("qwen2_5_vl", config_parser="qwen_vl_trt.model.spec:parse_qwen2_5_vl",
           vision_inputs=_WINDOWS,
           vision_exporter="qwen_vl_trt.export.vision_qwen2_5:export_vision_qwen2_5",
           vision_feeds="qwen_vl_trt.runtime.vision_inputs:qwen2_5_vl_feeds",
           rope_index="qwen_vl_trt.runtime.positions:qwen2_5_vl_prompt_positions",
           video_preprocess="qwen_vl_trt.runtime.video:preprocess_video_qwen2_5",
           video_prompt="qwen_vl_trt.runtime.prompt:qwen2_5_video_prompt",
           video_seconds_per_grid=True),
)}


def family_of(model_type, source: str = "config.json") -> Family:
    """The Family of a config.json `model_type`; CheckpointError naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[model_type]
