"""HF reference objects for the preprocessing / prompt / position tests.

What is HF's and what is ours:
- Images: `AutoImageProcessor.from_pretrained(ckpt)` -- HF's DEFAULT image processor, unmodified: with
  torchvision installed (scripts/setup.sh) that is `Qwen2VLImageProcessor` (torchvision backend), the one a
  user's `AutoProcessor.from_pretrained` gets and the one runtime/preprocess.py matches. `pil_image_processor`
  is HF's PIL backend (`Qwen2VLImageProcessorPil`), kept to show what it would give.
- Tokenizer: `AutoTokenizer.from_pretrained(ckpt)` -- unmodified (renders the checkpoint's chat template).
- Video: HF's `Qwen3VLVideoProcessor` / `Qwen2VLVideoProcessor` classes (imported from their modules, past the
  lazy-import torchvision guard; Qwen2-VL's module imports torchvision at top only for string annotations, so a
  stub module stands in during that import) with the three torchvision calls they make replaced:
  `convert_to_rgb` (`tvF.grayscale_to_rgb`, identity on the 3-channel frames we pass),
  `normalize` (`tvF.normalize` is `x.sub(mean).div(std)`, the same float32 ops), and
  `resize` -> only the identity is allowed (torchvision returns the input when the size is unchanged);
  a frame that would need resizing raises, so video pixel tests use frame sizes that the processor keeps.
  Everything else (frame sampling, whole-clip smart_resize, fused rescale/normalize constants, temporal
  padding, patchify, grids, timestamps, placeholder text) is HF's code.
- Processor: `Qwen3VLProcessor` / `Qwen2_5_VLProcessor(image_processor, tokenizer, video_processor,
  chat_template)` -- HF's.
- `real_qwen3_video_processor` / `real_qwen2_video_processor`: HF's video classes as they are, torchvision resize
  included (tests/test_video_vs_hf.py); with torchvision importable no stub is ever put in its place.
- `get_rope_index`: HF's unbound methods called on a stand-in `self` holding only the config values they read
  (no model weights needed); the code that runs is HF's.
"""
from __future__ import annotations

import functools
import importlib
import json
import types
from pathlib import Path

import torch


def image_processor(ckpt: Path):
    """HF's default image processor for the checkpoint (what `AutoProcessor.from_pretrained` picks)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(ckpt))


def pil_image_processor(ckpt: Path):
    """HF's PIL backend (`Qwen2VLImageProcessorPil`): not the default when torchvision is installed."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(ckpt))


def tokenizer(ckpt: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))


class _NoTorchvisionOps:
    """Mixin replacing the torchvision calls of HF's video processors (see module docstring)."""

    def convert_to_rgb(self, video):
        if video.shape[-3] != 3:
            raise NotImplementedError("reference video processor: pass RGB frames")
        return video

    def normalize(self, image, mean, std, inplace=False, **kwargs):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return image.sub(mean).div(std)

    def _identity_resize(self, image, size, **kwargs):
        if tuple(image.shape[-2:]) != (size.height, size.width):
            raise NotImplementedError(
                f"reference video processor refuses resizing {tuple(image.shape[-2:])} -> {(size.height, size.width)}")
        return image


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a build that does not match this torch
        return False
    return True


def _import_without_torchvision(module_name: str):
    """Import a video-processor module whose top-level `import torchvision...functional as tvF` is used only in
    (string) annotations: a stub stands in for torchvision during the import and is removed right after."""
    import sys

    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2", "torchvision.transforms.v2.functional"]
    if module_name in sys.modules or "torchvision" in sys.modules or _torchvision_imports():
        return importlib.import_module(module_name)  # a stub must never shadow a real torchvision
    stubs = {name: types.ModuleType(name) for name in names}
    for parent, child in zip(names, names[1:]):
        setattr(stubs[parent], child.rsplit(".", 1)[1], stubs[child])
    sys.modules.update(stubs)
    try:
        return importlib.import_module(module_name)
    finally:
        for name in names:
            sys.modules.pop(name, None)


def _patched(module_name: str, class_name: str):
    module = _import_without_torchvision(module_name)
    base = getattr(module, class_name)
    parent = base.__mro__[1]  # BaseVideoProcessor: the TorchvisionBackend.resize that the model's resize calls

    class Patched(_NoTorchvisionOps, base):
        pass

    # The model's resize() computes the target size then calls super().resize(image=..., size=...).
    original = parent.resize
    parent.resize = lambda self, *a, **k: (_NoTorchvisionOps._identity_resize(self, *a, **k)
                                           if isinstance(self, _NoTorchvisionOps) else original(self, *a, **k))
    Patched.__name__ = class_name
    return Patched


@functools.lru_cache(maxsize=None)
def qwen3_video_processor_class():
    return _patched("transformers.models.qwen3_vl.video_processing_qwen3_vl", "Qwen3VLVideoProcessor")


@functools.lru_cache(maxsize=None)
def qwen2_video_processor_class():
    return _patched("transformers.models.qwen2_vl.video_processing_qwen2_vl", "Qwen2VLVideoProcessor")


def real_qwen3_video_processor(ckpt: Path, **overrides):
    """HF's `Qwen3VLVideoProcessor` unmodified (torchvision backend: needs torchvision)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(**{**_config_kwargs(Path(ckpt) / "video_preprocessor_config.json"), **overrides})


def real_qwen2_video_processor(config: dict):
    """HF's `Qwen2VLVideoProcessor` unmodified (Qwen2.5-VL's video processor; needs torchvision)."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(**config)


def _config_kwargs(path: Path) -> dict:
    raw = json.loads(path.read_text())
    return {k: v for k, v in raw.items() if k not in ("processor_class", "video_processor_type", "image_processor_type")}


def qwen3_video_processor(ckpt: Path, **overrides):
    return qwen3_video_processor_class()(**{**_config_kwargs(Path(ckpt) / "video_preprocessor_config.json"), **overrides})


def qwen2_video_processor(config: dict):
    return qwen2_video_processor_class()(**config)


def _processor(processor_cls, ckpt: Path, video_processor):
    """HF processor of `processor_cls`. Its constructor checks `video_processor` against
    `transformers.BaseVideoProcessor`, which the lazy module hides without torchvision: that one check is
    answered with the real class."""
    from unittest import mock

    from transformers.processing_utils import ProcessorMixin
    from transformers.video_processing_utils import BaseVideoProcessor

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):
        if name == "video_processor":
            assert isinstance(arg, BaseVideoProcessor)
            return BaseVideoProcessor
        return original(self, name, arg)

    chat_template = (Path(ckpt) / "chat_template.jinja").read_text()
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check):
        return processor_cls(image_processor=image_processor(ckpt), tokenizer=tokenizer(ckpt),
                             video_processor=video_processor, chat_template=chat_template)


def qwen3_processor(ckpt: Path, video_processor=None):
    """HF `Qwen3VLProcessor` of a Qwen3-VL checkpoint (video: the patched class unless one is given)."""
    from transformers import Qwen3VLProcessor

    return _processor(Qwen3VLProcessor, ckpt, video_processor or qwen3_video_processor(ckpt))


def qwen2_5_processor(ckpt: Path, video_processor=None, **video_overrides):
    """HF `Qwen2_5_VLProcessor` of a Qwen2.5-VL checkpoint. The releases ship no video_preprocessor_config.json,
    so the video processor is made from preprocessor_config.json (image limits per frame), as HF does."""
    from transformers import Qwen2_5_VLProcessor

    video = video_processor or qwen2_video_processor(
        {**_config_kwargs(Path(ckpt) / "preprocessor_config.json"), **video_overrides})
    return _processor(Qwen2_5_VLProcessor, ckpt, video)


def _fake_model(model_cls, spatial_merge_size: int, tokens_per_second: int | None = None):
    vision = types.SimpleNamespace(spatial_merge_size=spatial_merge_size, tokens_per_second=tokens_per_second)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision))
    fake.get_vision_position_ids = functools.partial(model_cls.get_vision_position_ids, fake)
    return fake


def qwen3_get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None,
                         spatial_merge_size: int = 2):
    """HF `Qwen3VLModel.get_rope_index` on torch tensors -> (position_ids [3,B,S], deltas [B,1]) as numpy."""
    from transformers import Qwen3VLModel

    fake = _fake_model(Qwen3VLModel, spatial_merge_size)
    t = lambda x: None if x is None else torch.as_tensor(x, dtype=torch.long)  # noqa: E731
    pos, deltas = Qwen3VLModel.get_rope_index(fake, t(input_ids), t(mm_token_type_ids), t(image_grid_thw),
                                              t(video_grid_thw), t(attention_mask))
    return pos.numpy(), deltas.numpy()


def qwen2_5_get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                           second_per_grid_ts=None, attention_mask=None, spatial_merge_size: int = 2,
                           tokens_per_second: int = 2):
    """HF `Qwen2_5_VLModel.get_rope_index` (5.24) -> (position_ids [3,B,S], deltas [B,1]) as numpy."""
    from transformers import Qwen2_5_VLModel

    fake = _fake_model(Qwen2_5_VLModel, spatial_merge_size, tokens_per_second)
    t = lambda x: None if x is None else torch.as_tensor(x, dtype=torch.long)  # noqa: E731
    secs = None if second_per_grid_ts is None else torch.as_tensor(second_per_grid_ts, dtype=torch.float32)
    pos, deltas = Qwen2_5_VLModel.get_rope_index(fake, t(input_ids), t(mm_token_type_ids), t(image_grid_thw),
                                                 t(video_grid_thw), secs, t(attention_mask))
    return pos.numpy(), deltas.numpy()
