"""One request (runtime/request.py: system + prompt + images + video) -> the host tensors generation needs, in
prompt order.

`Preprocessor(manifest).prepare(Request)`: check the image sizes from their headers (runtime/media_limits.py),
decode the images in a bounded worker process (runtime/media_guard.py), patchify the media (runtime/preprocess.py,
video.py),
render the chat template and expand the vision placeholders (runtime/prompt.py), compute the MRoPE
positions and rope delta of the prompt (runtime/positions.py), and check it against the artifact limits.
`vision_feeds(spec, pixel_values, grids)` builds the vision graph's host inputs (runtime/vision_inputs.py).
Media order is the order of their placeholders: the images, then the video (`prompt.build_messages`).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from qwen_vl_trt.model.errors import PromptTooLong

from . import media_guard, media_limits, preprocess, prompt, video, vision_inputs
from .request import Request


@dataclass(frozen=True)
class Media:
    pixel_values: np.ndarray  # float32 [T, patch_dim]
    grid_thw: tuple  # (t, h, w) in patches

    @cached_property
    def digest(self) -> bytes:
        """16 bytes naming this item's content: the first 16 bytes of SHA-256 over the grid, the pixels' shape
        and dtype, and their bytes. The key of the encoder and prefix caches (runtime/encoder_cache.py,
        runtime/prefix_cache.py), computed once per item, by `Preprocessor.prepare`. SHA-256 rather than BLAKE2b:
        cryptographic either way (a client must not make its image collide with another's), and with the CPU's
        SHA extensions it hashes a 448x448 image's 4.8 MB of float32 pixels in 12 ms against BLAKE2b's 20
        (docs/benchmarks.md, "Prefix and encoder caches")."""
        h = hashlib.sha256()
        pixels = np.ascontiguousarray(self.pixel_values)
        h.update(repr((tuple(int(v) for v in self.grid_thw), pixels.shape, pixels.dtype.str)).encode())
        h.update(memoryview(pixels).cast("B"))
        return h.digest()[:16]


@dataclass(frozen=True)
class PreparedRequest:
    input_ids: np.ndarray  # int64 [S]
    position_ids: np.ndarray  # int64 [3, S]
    rope_delta: int
    media: tuple = ()  # Media in prompt order
    timings: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def vision_feeds(spec, pixel_values: np.ndarray, grids) -> dict:
    """Host inputs of vision.onnx for patches of several images/videos (grids int [n, 3], prompt order)."""
    merge = spec.vision.spatial_merge_size
    return {"pixel_values": np.ascontiguousarray(pixel_values, np.float32),
            "rotary_pos_ids": vision_inputs.rotary_pos_ids(grids, merge),
            "cu_seqlens": vision_inputs.cu_seqlens(grids),
            **spec.family.load("vision_feeds")(spec, grids)}


class Preprocessor:
    """Tokenizer, chat template and processor configs of an artifact directory."""

    def __init__(self, manifest):
        self.manifest, self.spec = manifest, manifest.spec
        self.tokenizer = prompt.Tokenizer(manifest.directory)
        self.image_cfg = preprocess.ImageProcessorConfig.from_dir(manifest.directory)
        media_limits.set_decompression_bomb_limit(self.image_cfg)
        self.family = self.spec.family  # model/families.py

    def load_video(self, path: str):
        """The processed video (pixels, grid, timestamps; Qwen2.5-VL also second_per_grid_ts)."""
        cfg = video.VideoProcessorConfig.from_dir(self.manifest.directory)
        return self.family.load("video_preprocess")(path, cfg)

    def prepare(self, request: Request) -> PreparedRequest:
        t0 = time.perf_counter()
        names = [_media_name(p, i) for i, p in enumerate(request.images)]
        media_limits.check_images(request.images, names, self.image_cfg, self.manifest.limits)  # before decoding
        decode = media_guard.pool().decode  # in a worker process, bounded in time and memory
        images = [preprocess.preprocess_image(decode(p, name), self.image_cfg)
                  for p, name in zip(request.images, names)]
        vid = self.load_video(request.video) if request.video is not None else None
        media = [Media(pv, tuple(grid)) for pv, grid in images]
        if vid is not None:
            media.append(Media(vid.pixel_values, tuple(vid.grid_thw)))
        self._check_media(media, request)
        messages = prompt.build_messages(request.prompt, request.system, n_images=len(images), video=vid is not None)
        image_grids = [g for _, g in images]
        video_grids = [vid.grid_thw] if vid is not None else []
        built = prompt.build_prompt(self.tokenizer, messages, image_grids=image_grids, video_grids=video_grids,
                                    video_timestamps=[vid.timestamps] if vid is not None else [],
                                    family=self.spec.model_type, merge_size=self.spec.vision.spatial_merge_size)
        limit = self.manifest.limits.max_seq
        if len(built.input_ids) > limit:
            raise PromptTooLong(f"prompt has {len(built.input_ids)} tokens, artifacts allow at most {limit}: "
                                "re-export with a larger --max-seq")
        pos, delta = self._positions(built, image_grids, video_grids, vid)
        for m in media:  # hashed here, on the request's thread, not on the engine's that steps every request
            m.digest  # noqa: B018 (a cached property)
        return PreparedRequest(built.input_ids, pos[:, 0], int(delta[0]), tuple(media),
                               {"preprocess_ms": 1e3 * (time.perf_counter() - t0)})

    def _positions(self, built, image_grids, video_grids, vid):
        rope_index = self.family.load("rope_index")  # runtime/positions.py
        return rope_index(self.spec, built.input_ids[None], built.mm_token_type_ids[None], image_grids, video_grids,
                          vid)

    def _check_media(self, media: list, request: Request) -> None:
        lim = self.manifest.limits
        names = [_media_name(p, i) for i, p in enumerate(request.images)] + \
            ([str(request.video)] if request.video is not None else [])
        for name, m in zip(names, media):
            t, h, w = m.grid_thw
            if t * h * w > lim.max_patches:
                raise media_limits.too_many_patches(name, t * h * w, lim.max_patches)
            if t > lim.max_frames:
                raise PromptTooLong(f"{name} needs {t} temporal patches, artifacts allow at most {lim.max_frames} "
                                    "per vision call: re-export with a larger --max-frames or pass fewer frames")


def _media_name(image, index: int) -> str:
    """What messages call an image: its path, or `<image i>` for bytes."""
    return f"<image {index}>" if isinstance(image, (bytes, bytearray, memoryview)) else str(image)
