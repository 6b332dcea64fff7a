"""onnxruntime-genai's Qwen3-VL vision and embedding graphs, written from ours (project venv; bench only).

onnxruntime-genai's model builder writes only the text decoder; its Qwen3-VL pipeline (`"type": "qwen3_vl"` in
genai_config.json) also wants, in the contract of its repository's test/models/qwen3-vl:
- vision: `pixel_values` [num_patches, 1536] fp32 (its own C++ processor: smart resize, patches in HF order) and
  `image_grid_thw` [num_images, 3] int64 -> `image_features` [num_merged, hidden];
- embedding: `input_ids` [batch, seq] int64 and `image_features` -> `inputs_embeds` [batch, seq, hidden], the
  image-pad tokens' rows replaced by the image features in order.

The vision graph here is our vision.ort.onnx with its grid-derived inputs (rotary_pos_ids, cu_seqlens, the
family's position-embedding taps: runtime/pipeline.py vision_feeds) frozen as constants for the one grid of the
benchmark's image, so it is valid for that image size only; DeepStack outputs are dropped (onnxruntime-genai has
no DeepStack input: its tokens are not HF's). The embedding graph is a Gather of the embedding table plus the
image rows, built with onnx.helper.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def write_vision(ours_dir: Path, out_dir: Path, grid: tuple[int, int, int]) -> Path:
    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.runtime.pipeline import vision_feeds

    spec = load_manifest(ours_dir).spec
    t, h, w = grid
    frozen = {k: v for k, v in vision_feeds(spec, np.zeros((t * h * w, 1), np.float32), np.array([grid])).items()
              if k != "pixel_values"}
    model = onnx.load(str(ours_dir / "vision.ort.onnx"), load_external_data=False)
    g = model.graph
    keep = [i for i in g.input if i.name not in frozen]
    del g.input[:]
    g.input.extend(keep + [helper.make_tensor_value_info("image_grid_thw", TensorProto.INT64, ["num_images", 3])])
    g.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in frozen.items())
    feats = next(o for o in g.output if o.name == "vision_features")
    del g.output[:]
    g.output.extend([feats])
    g.node.append(helper.make_node("Identity", ["vision_features"], ["image_features"]))
    g.output[0].name = "image_features"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "vision.onnx.data"
    if data.is_symlink():  # ONNX Runtime refuses external data that resolves outside the model's folder
        data.unlink()
    if not data.exists():
        try:  # a hard link: no second copy on disk
            os.link(ours_dir / "vision.onnx.data", data)
        except OSError:
            shutil.copyfile(ours_dir / "vision.onnx.data", data)
    onnx.save_model(model, str(out_dir / "vision.onnx"))
    return out_dir / "vision.onnx"


def write_embedding(ours_dir: Path, out_dir: Path, image_token_id: int) -> Path:
    """inputs_embeds = table[input_ids], with row k of image_features where input_ids is the k-th image pad."""
    embed = onnx.load(str(ours_dir / "embed.onnx"))  # the table (fp32 [V, C]) is its largest initializer
    table = max(embed.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(table, base_dir=str(ours_dir)).astype(np.float32)
    c = arr.shape[1]
    nodes = [
        helper.make_node("Gather", ["embed_table", "input_ids"], ["text_embeds"]),  # [B, S, C]
        helper.make_node("Equal", ["input_ids", "image_token"], ["is_image"]),  # [B, S]
        helper.make_node("Cast", ["is_image"], ["is_image_i64"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["is_image_i64", "minus_one"], ["flat"]),
        helper.make_node("CumSum", ["flat", "zero"], ["count"]),
        helper.make_node("Sub", ["count", "one"], ["row"]),
        helper.make_node("Max", ["row", "zero"], ["row0"]),  # text rows point at row 0 (not used)
        helper.make_node("Concat", ["image_features", "zero_row"], ["rows"], axis=0),  # never empty
        helper.make_node("Gather", ["rows", "row0"], ["image_flat"]),  # [B*S, C]
        helper.make_node("Shape", ["text_embeds"], ["shape"]),
        helper.make_node("Reshape", ["image_flat", "shape"], ["image_embeds"]),
        helper.make_node("Unsqueeze", ["is_image", "minus_one"], ["mask"]),
        helper.make_node("Where", ["mask", "image_embeds", "text_embeds"], ["inputs_embeds"]),
    ]
    inits = [numpy_helper.from_array(arr, "embed_table"),
             numpy_helper.from_array(np.array(image_token_id, np.int64), "image_token"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.zeros((1, c), np.float32), "zero_row")]
    graph = helper.make_graph(
        nodes, "embedding", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                             helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["num_logical_patches", c])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", c])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = out_dir / "embedding.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="embedding.onnx.data",
                    size_threshold=1024)
    return path


def write_config(out_dir: Path, ckpt: Path, threads: int) -> None:
    """genai_config.json: the builder's decoder entry, `qwen3_vl` (the builder writes `qwen3vl`, which the runtime
    refuses), the vision / embedding entries and 2-thread session options; processor_config.json."""
    cfg_path = out_dir / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    hf = json.loads((ckpt / "config.json").read_text())
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    session = {"log_id": "onnxruntime-genai", "provider_options": [], "intra_op_num_threads": threads,
               "inter_op_num_threads": 1}
    m = cfg["model"]
    m["type"] = "qwen3_vl"
    m["decoder"]["session_options"] = dict(session)
    m.update(image_token_id=hf["image_token_id"], video_token_id=hf["video_token_id"],
             vision_start_token_id=hf["vision_start_token_id"])
    v = hf["vision_config"]
    m["embedding"] = {"filename": "embedding.onnx", "inputs": {"input_ids": "input_ids",
                                                               "image_features": "image_features"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}, "session_options": dict(session)}
    m["vision"] = {"filename": "vision.onnx", "config_filename": "processor_config.json",
                   "spatial_merge_size": v["spatial_merge_size"], "tokens_per_second": 2.0,
                   "patch_size": v["patch_size"], "window_size": 64,
                   "inputs": {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"},
                   "outputs": {"image_features": "image_features"}, "session_options": dict(session)}
    cfg_path.write_text(json.dumps(cfg, indent=2))
    size = pre.get("size", {})
    proc = {"processor": {"name": "qwen3_vl_image_processor", "transforms": [
        {"operation": {"name": "decode_image", "type": "DecodeImage", "attrs": {"color_space": "RGB"}}},
        {"operation": {"name": "convert_to_rgb", "type": "ConvertRGB"}},
        {"operation": {"name": "resize", "type": "Resize", "attrs": {
            "width": 540, "height": 360, "smart_resize": 1, "min_pixels": size.get("shortest_edge", 65536),
            "max_pixels": size.get("longest_edge", 16777216), "patch_size": v["patch_size"],
            "merge_size": v["spatial_merge_size"]}}},
        {"operation": {"name": "rescale", "type": "Rescale", "attrs": {"rescale_factor": 1 / 255}}},
        {"operation": {"name": "normalize", "type": "Normalize", "attrs": {
            "mean": pre.get("image_mean", [0.5] * 3), "std": pre.get("image_std", [0.5] * 3), "qwen3_vl": 1}}},
        {"operation": {"name": "patch_image", "type": "PatchImage", "attrs": {
            "patch_size": v["patch_size"], "temporal_patch_size": v.get("temporal_patch_size", 2),
            "merge_size": v["spatial_merge_size"]}}}]}}
    (out_dir / "processor_config.json").write_text(json.dumps(proc, indent=2))


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours_dense", type=Path, help="our fp32 dense artifact directory")
    ap.add_argument("out_dir", type=Path, help="onnxruntime-genai model directory (the builder's output)")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--grid", type=int, nargs=3, required=True, metavar=("T", "H", "W"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    hf = json.loads((args.checkpoint / "config.json").read_text())
    write_vision(args.ours_dense, args.out_dir, tuple(args.grid))
    write_embedding(args.ours_dense, args.out_dir, hf["image_token_id"])
    write_config(args.out_dir, args.checkpoint, args.threads)
    print(f"onnxruntime-genai vision/embedding graphs and configs in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
