"""Image and video preprocessing (runtime/preprocess.py, runtime/video.py) against HF's processors.

Reference (see tests/hf_processor.py): HF's DEFAULT image processor (`AutoImageProcessor.from_pretrained`,
what `AutoProcessor` picks: with torchvision installed `Qwen2VLImageProcessor`, the torchvision backend)
unmodified, fed the same file path (HF then decodes it itself). HF's PIL backend (`Qwen2VLImageProcessorPil`)
would differ: PIL bicubic resize is 1-2 uint8 levels off on some values (more when one side grows and the
other shrinks) and its unfused float64 rescale moves last bits (test_pil_backend_is_not_the_default); HF's `Qwen3VLVideoProcessor` / `Qwen2VLVideoProcessor` with
only their torchvision calls replaced (identity RGB check, `sub().div()` normalize, identity resize), so video
pixel tests use frame sizes the processor keeps; resizing decisions are checked against HF's own
`smart_resize` functions. Pixel values are compared exactly (max |diff| == 0): every step is the same
operation on the same dtype.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

import hf_processor as H
from qwen_vl_trt.export.demo_checkpoint import make_checkpoint
from qwen_vl_trt.runtime import preprocess as pp
from qwen_vl_trt.runtime import video as V
from qwen_vl_trt.model.errors import ImageError, VideoError

QWEN2_5_VL_PREPROCESSOR = {  # released Qwen2.5-VL preprocessor_config.json values (notes section 5)
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("preprocess_ckpt"), "qwen3_vl")


@pytest.fixture(scope="module")
def hf_images(ckpt):
    from transformers import AutoProcessor, Qwen2VLImageProcessor

    processor = H.image_processor(ckpt)
    assert type(processor) is Qwen2VLImageProcessor and processor.backend == "torchvision"  # HF's default
    assert type(AutoProcessor.from_pretrained(str(ckpt)).image_processor) is Qwen2VLImageProcessor
    return processor


@pytest.fixture(scope="module")
def cfg(ckpt):
    return pp.ImageProcessorConfig.from_dir(ckpt)


def _assert_same(ours, hf_out):
    pixel_values, grid = ours
    assert pixel_values.dtype == np.float32 and hf_out["pixel_values"].dtype == np.float32
    assert tuple(hf_out["image_grid_thw"][0].tolist()) == grid
    assert pixel_values.shape == hf_out["pixel_values"].shape
    assert np.abs(pixel_values - hf_out["pixel_values"]).max() <= 1e-6  # in fact 0: same ops, same dtypes
    assert np.array_equal(pixel_values, hf_out["pixel_values"])


def _random_image(rng, h, w, mode="RGB"):
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 2), dtype=np.uint8), "LA")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "CMYK":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "CMYK")
    if mode in ("P", "P-transparent"):
        img = _random_image(rng, h, w).quantize(colors=32)
        if mode == "P-transparent":
            img.info["transparency"] = 3
        return img
    raise ValueError(mode)


# (height, width): tiny, odd, half-even rounding boundaries (80/32 = 2.5), wide/tall, near the aspect limit.
SIZES = [(5, 7), (1, 1), (31, 33), (48, 80), (80, 80), (96, 112), (120, 160), (160, 120), (224, 224),
         (255, 257), (300, 1000), (1000, 300), (37, 1901), (1901, 37), (10, 1999), (512, 384), (333, 517),
         (640, 480), (17, 800), (700, 699), (64, 12800)]


@pytest.mark.parametrize("height,width", SIZES)
def test_image_sizes_match_hf(tmp_path, hf_images, cfg, height, width):
    rng = np.random.default_rng(height * 10007 + width)
    path = tmp_path / "img.png"
    _random_image(rng, height, width).save(path)
    _assert_same(pp.preprocess_image(pp.load_image(path), cfg), hf_images(images=[str(path)], return_tensors="np"))


@pytest.mark.parametrize("mode,suffix", [("L", ".png"), ("RGBA", ".png"), ("LA", ".png"), ("CMYK", ".jpg"),
                                         ("P", ".png"), ("P-transparent", ".png"), ("RGB", ".webp"), ("RGB", ".bmp")])
def test_image_modes_match_hf(tmp_path, hf_images, cfg, mode, suffix):
    rng = np.random.default_rng(7)
    path = tmp_path / f"img{suffix}"
    img = _random_image(rng, 75, 130, mode)
    img.save(path, **({"transparency": 3} if mode == "P-transparent" else {}))
    assert Image.open(path).mode == ("P" if mode.startswith("P") else mode)
    if suffix == ".bmp":  # HF's default processor decodes paths with torchvision, which cannot read BMP
        with pytest.raises(RuntimeError):
            hf_images(images=[str(path)], return_tensors="np")
        _assert_same(pp.preprocess_image(pp.load_image(path), cfg), hf_images(images=[Image.open(path)], return_tensors="np"))
        return
    _assert_same(pp.preprocess_image(pp.load_image(path), cfg), hf_images(images=[str(path)], return_tensors="np"))


def test_rgba_pil_image_composited_on_white_like_hf(tmp_path, hf_images, cfg):
    """A PIL image with alpha handed to the processor is composited on white (the torchvision backend passes PIL
    inputs to the same `convert_to_rgb` as the PIL backend); the same image given as a path is decoded to RGB
    by HF (`decode_image(mode=RGB)`: alpha dropped). Both match HF."""
    rng = np.random.default_rng(3)
    img = _random_image(rng, 90, 70, "RGBA")
    ours_pil = pp.preprocess_image(img, cfg)
    _assert_same(ours_pil, hf_images(images=[img], return_tensors="np"))
    path = tmp_path / "a.png"
    img.save(path)
    ours_path = pp.preprocess_image(pp.load_image(path), cfg)
    _assert_same(ours_path, hf_images(images=[str(path)], return_tensors="np"))
    assert not np.array_equal(ours_pil[0], ours_path[0])  # the two HF routes really differ


def test_exif_rotated_jpeg_matches_hf(tmp_path, hf_images, cfg):
    rng = np.random.default_rng(11)
    img = _random_image(rng, 60, 140)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    loaded = pp.load_image(path)
    assert loaded.size == (60, 140)  # transposed: displayed height is the stored width
    _assert_same(pp.preprocess_image(loaded, cfg), hf_images(images=[str(path)], return_tensors="np"))


def test_huge_image_capped_by_max_pixels(tmp_path, ckpt):
    """max_pixels caps the area (a small cap keeps the test fast; the rule is the same for 4096^2)."""
    raw = {**H._config_kwargs(ckpt / "preprocessor_config.json"), "size": {"shortest_edge": 65536, "longest_edge": 640 * 640}}
    hf = H.image_processor(ckpt).__class__(**raw)
    cfg = pp.ImageProcessorConfig.from_dict(raw)
    rng = np.random.default_rng(5)
    path = tmp_path / "big.png"
    _random_image(rng, 1500, 2300).save(path)
    ours = pp.preprocess_image(pp.load_image(path), cfg)
    _assert_same(ours, hf(images=[str(path)], return_tensors="np"))
    _, h, w = ours[1]
    assert h * w * 16 * 16 <= 640 * 640


def test_batch_helper_matches_hf(tmp_path, hf_images, cfg):
    rng = np.random.default_rng(9)
    paths = []
    for i, (h, w) in enumerate([(50, 90), (200, 120), (33, 33)]):
        paths.append(tmp_path / f"{i}.png")
        _random_image(rng, h, w).save(paths[-1])
    pixel_values, grids = pp.preprocess_images([pp.load_image(p) for p in paths], cfg)
    ref = hf_images(images=[str(p) for p in paths], return_tensors="np")
    assert grids.dtype == np.int64 and np.array_equal(grids, ref["image_grid_thw"])
    assert np.array_equal(pixel_values, ref["pixel_values"])


def test_qwen2_5_image_normalization_matches_hf(tmp_path):
    """CLIP mean/std and factor 28 (Qwen2.5-VL)."""
    from transformers import Qwen2VLImageProcessor  # the default for Qwen2.5-VL's released config too

    hf = Qwen2VLImageProcessor(**QWEN2_5_VL_PREPROCESSOR)
    cfg = pp.ImageProcessorConfig.from_dict(QWEN2_5_VL_PREPROCESSOR)
    rng = np.random.default_rng(13)
    for h, w in [(120, 160), (29, 300), (400, 250)]:
        path = tmp_path / f"{h}x{w}.png"
        _random_image(rng, h, w).save(path)
        _assert_same(pp.preprocess_image(pp.load_image(path), cfg), hf(images=[str(path)], return_tensors="np"))


def test_pil_backend_is_not_the_default(tmp_path, ckpt, hf_images, cfg):
    """What HF's PIL backend would give (not what `AutoProcessor` picks with torchvision): off by a few levels'
    worth after normalization where the resize is not the identity; the runtime follows the default."""
    pil = H.pil_image_processor(ckpt)
    rng = np.random.default_rng(19)
    for h, w in [(120, 160), (300, 1000), (64, 12800)]:
        path = tmp_path / f"{h}x{w}.png"
        _random_image(rng, h, w).save(path)
        ours = pp.preprocess_image(pp.load_image(path), cfg)[0]
        assert np.array_equal(ours, hf_images(images=[str(path)], return_tensors="np")["pixel_values"])
        assert not np.array_equal(ours, pil(images=[str(path)], return_tensors="np")["pixel_values"])


def test_smart_resize_matches_hf_function():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(17)
    cases = [(80, 80), (48, 48), (16, 16), (112, 112), (1, 200), (4096, 4096), (5000, 7000)]
    cases += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    for factor, lo, hi in [(32, 65536, 16777216), (28, 3136, 12845056), (32, 4096, 640 * 640)]:
        for h, w in cases:
            if max(h, w) / min(h, w) > 200:
                continue
            assert pp.smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, factor)
    assert pp.smart_resize(80, 80, 32, 0, 10**9) == (64, 64)  # round half to even: 2.5 -> 2


def test_extreme_aspect_ratio_is_image_error(tmp_path, hf_images, cfg):
    path = tmp_path / "strip.png"
    _random_image(np.random.default_rng(0), 2, 402).save(path)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        hf_images(images=[str(path)], return_tensors="np")
    with pytest.raises(ImageError) as e:
        pp.preprocess_image(pp.load_image(path), cfg)
    assert str(e.value) == "image 402x2 has aspect ratio 201.0 > 200; crop or pad it to at most 200:1"


def test_bad_image_files(tmp_path):
    missing = tmp_path / "nope.png"
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    buf = io.BytesIO()
    _random_image(np.random.default_rng(1), 64, 64).save(buf, format="PNG")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases = {
        missing: f"image not found: {missing}; check the path",
        tmp_path: f"image path is a directory: {tmp_path}; pass an image file",
        empty: f"image file is empty: {empty}; pass a valid PNG, JPEG or WebP image",
        text: f"cannot read image {text}: not a supported image format; convert it to PNG or JPEG",
        truncated: f"cannot read image {truncated}: file is corrupt or truncated (",
    }
    for path, start in cases.items():
        with pytest.raises(ImageError) as e:
            pp.load_image(path)
        assert str(e.value).startswith(start), str(e.value)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- video

def _write_frames(directory, rng, n, h, w):
    directory.mkdir()
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    for i, f in enumerate(frames):
        Image.fromarray(f).save(directory / f"frame_{i:04d}.png")
    return np.stack(frames)  # [F, H, W, 3]


@pytest.mark.parametrize("n,frames_fps,h,w", [(9, 4.0, 64, 96), (5, 1.0, 96, 64), (30, 24.0, 128, 160),
                                              (61, 10.0, 32, 32), (4, 30.0, 64, 64), (300, 30.0, 32, 64)])
def test_qwen3_video_frames_match_hf(tmp_path, ckpt, n, frames_fps, h, w):
    from transformers.video_utils import VideoMetadata

    rng = np.random.default_rng(n)
    video = _write_frames(tmp_path / "frames", rng, n, h, w)
    cfg = V.VideoProcessorConfig.from_dir(ckpt)
    ours = V.preprocess_video_qwen3(tmp_path / "frames", cfg, frames_fps=frames_fps)
    hf = H.qwen3_video_processor(ckpt)
    ref = hf(videos=[video], video_metadata=[VideoMetadata(total_num_frames=n, fps=frames_fps)],
             return_tensors="np", return_metadata=True, cap_pixels_per_frame=False)
    indices = ref["video_metadata"][0].frames_indices
    assert np.array_equal(ours.frame_indices, indices)
    assert tuple(ref["video_grid_thw"][0].tolist()) == ours.grid_thw
    assert ours.pixel_values.dtype == np.float32
    assert np.array_equal(ours.pixel_values, ref["pixel_values_videos"])  # exact
    processor_cls = __import__("transformers").Qwen3VLProcessor
    stamps = processor_cls._calculate_timestamps(None, indices, frames_fps, 2)
    assert ours.timestamps == tuple(stamps) and len(stamps) == ours.grid_thw[0]


def test_qwen3_video_resize_decision_matches_hf():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video_smart_resize

    rng = np.random.default_rng(23)
    cases = [(4, 10, 20), (2, 31, 33), (768, 1080, 1920), (5, 720, 1280), (3, 5, 600)]
    cases += [(int(rng.integers(2, 800)), int(rng.integers(8, 2200)), int(rng.integers(8, 2200))) for _ in range(300)]
    for t, h, w in cases:
        for lo, hi in [(4096, 25165824), (4096, 64 * 64 * 8)]:
            try:
                expected = hf_video_smart_resize(t, h, w, 2, 32, lo, hi)
            except ValueError:
                with pytest.raises(VideoError):
                    V.qwen3_video_smart_resize(t, h, w, 2, 32, lo, hi)
                continue
            assert V.qwen3_video_smart_resize(t, h, w, 2, 32, lo, hi) == expected, (t, h, w)


def test_qwen3_sampling_matches_hf(ckpt):
    from transformers.video_utils import VideoMetadata

    hf = H.qwen3_video_processor(ckpt)
    for total, video_fps in [(1, 24.0), (3, 30.0), (9, 4.0), (100, 29.97), (1000, 25.0), (5000, 60.0), (77, 7.5)]:
        for fps in (2.0, 1.0, 0.5):
            expected = hf.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps)
            assert np.array_equal(V.qwen3_sample_indices(total, video_fps, fps, 4, 768), expected)


@pytest.mark.parametrize("n,frames_fps,h,w", [(12, 6.0, 56, 84), (7, 2.0, 84, 56), (40, 24.0, 28, 112)])
def test_qwen2_5_video_matches_hf(tmp_path, n, frames_fps, h, w):
    from transformers.video_utils import VideoMetadata

    rng = np.random.default_rng(n)
    video = _write_frames(tmp_path / "frames", rng, n, h, w)
    cfg = V.VideoProcessorConfig(pp.ImageProcessorConfig.from_dict(QWEN2_5_VL_PREPROCESSOR), fps=2.0,
                                 min_frames=4, max_frames=768)
    ours = V.preprocess_video_qwen2_5(tmp_path / "frames", cfg, frames_fps=frames_fps)
    hf = H.qwen2_video_processor(QWEN2_5_VL_PREPROCESSOR)
    meta = VideoMetadata(total_num_frames=n, fps=frames_fps)
    ref = hf(videos=[video], video_metadata=[meta], do_sample_frames=True, fps=2.0, return_tensors="np",
             return_metadata=True, cap_pixels_per_frame=False)
    ref_meta = ref["video_metadata"][0]
    assert np.array_equal(ours.frame_indices, np.asarray(ref_meta.frames_indices))
    assert tuple(ref["video_grid_thw"][0].tolist()) == ours.grid_thw
    assert np.array_equal(ours.pixel_values, ref["pixel_values_videos"])
    # Qwen2_5_VLProcessor: second_per_grid_ts = temporal_patch_size / metadata.sampled_fps
    assert ours.second_per_grid_ts == 2 / ref_meta.sampled_fps


def test_video_errors(tmp_path, ckpt):
    cfg = V.VideoProcessorConfig.from_dir(ckpt)
    with pytest.raises(VideoError, match=r"^video not found: .*; check the path$"):
        V.preprocess_video_qwen3(tmp_path / "missing.mp4", cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match=r"^frame directory .* holds no images; put the frames there"):
        V.preprocess_video_qwen3(tmp_path / "empty", cfg)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    try:
        import av  # noqa: F401
    except ImportError:
        with pytest.raises(VideoError) as e:
            V.preprocess_video_qwen3(clip, cfg)
        assert str(e.value) == ("cannot decode clip.mp4: PyAV is not installed; pip install av, "
                                "or pass a directory of frame images")
    else:
        with pytest.raises(VideoError, match=r"^cannot decode video "):
            V.preprocess_video_qwen3(clip, cfg)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 64)).save(mixed / "0.png")
    Image.new("RGB", (64, 96)).save(mixed / "1.png")
    with pytest.raises(VideoError, match=r"^video frames differ in size"):
        V.preprocess_video_qwen3(mixed, cfg, frames_fps=2.0)
    assert math.isclose(cfg.fps, 2.0)
