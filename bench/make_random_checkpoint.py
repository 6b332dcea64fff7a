"""Random-weight checkpoint with the real config.json of a released Qwen3-VL model, written without the model in RAM.

  python bench/make_random_checkpoint.py 8B /tmp/qwen3vl-8b-random [--dtype bf16] [--shard-gb 2]
  python bench/make_random_checkpoint.py 2B /tmp/qwen3vl-2b-8L --text-layers 8 --vision-depth 8   # cut in depth
  python bench/make_random_checkpoint.py --check-keys      # key names/shapes == save_pretrained (tiny model)

Parameter names and shapes come from the HF model instantiated on the `meta` device (no storage), so the
keys are exactly the ones `save_pretrained` writes (model.language_model.*, model.visual.*, lm_head.weight;
tied models have no lm_head.weight). Shards are written as raw safetensors files (header, then each tensor
streamed in chunks) with a model.safetensors.index.json, so the process holds one chunk (64 MiB) plus a
random pool (64 MiB), not a shard and never the model.

The values are cheap random, not from an init scheme: each chunk is a slice at a random offset of one
pool of N(0, 1) numbers, scaled by 0.02 (matrices, biases) or 1 + 0.1 * x (norm weights). They are only
meant to exercise the export (sizes, I/O, memory), not to produce meaningful text.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

# Released Qwen3-VL configs (the config.json files of the Qwen/Qwen3-VL-* repositories on the Hugging Face Hub,
# e.g. https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json). Written in the released
# (transformers 4.57) layout: rope_scaling + rope_theta inside text_config. MoE: (experts, top-k, moe_inter).
RELEASED = {
    #        text hidden, inter, layers, heads, kv, tie | vision depth, hidden, inter, out | deepstack
    "2B": dict(text=(2048, 6144, 28, 16, 8), tie=True, vision=(24, 1024, 4096, 2048), deepstack=[5, 11, 17]),
    "4B": dict(text=(2560, 9728, 36, 32, 8), tie=True, vision=(24, 1024, 4096, 2560), deepstack=[5, 11, 17]),
    "8B": dict(text=(4096, 12288, 36, 32, 8), tie=False, vision=(27, 1152, 4304, 4096), deepstack=[8, 16, 24]),
    "32B": dict(text=(5120, 25600, 64, 64, 8), tie=False, vision=(27, 1152, 4304, 5120), deepstack=[8, 16, 24]),
    "30B-A3B": dict(text=(2048, 6144, 48, 32, 4), tie=False, vision=(27, 1152, 4304, 2048), deepstack=[8, 16, 24],
                    moe=(128, 8, 768)),
    "235B-A22B": dict(text=(4096, 12288, 94, 64, 4), tie=False, vision=(27, 1152, 4304, 4096), deepstack=[8, 16, 24],
                      moe=(128, 8, 1536)),
}

ST_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
CHUNK = 32 << 20  # elements per write (64 MiB in bf16)
POOL = 32 << 20  # elements of N(0, 1) reused at random offsets


def released_config(name: str, dtype: str = "bf16", text_layers: int | None = None,
                    vision_depth: int | None = None) -> dict:
    """The released config of `name`; `text_layers` / `vision_depth` cut the depth (same per-layer shapes).
    A cut vision tower keeps its DeepStack taps at the same fraction of the depth (floor(i * depth / full)),
    e.g. 2B's [5, 11, 17] of 24 -> [1, 3, 5] of 8."""
    r = RELEASED[name]
    cfg = _dense_config(r, dtype)
    if text_layers:
        cfg["text_config"]["num_hidden_layers"] = text_layers
    if vision_depth:
        full = cfg["vision_config"]["depth"]
        taps = sorted({i * vision_depth // full for i in cfg["vision_config"]["deepstack_visual_indexes"]})
        cfg["vision_config"].update(depth=vision_depth, deepstack_visual_indexes=taps)
    if "moe" in r:
        experts, top_k, moe_inter = r["moe"]
        cfg.update(architectures=["Qwen3VLMoeForConditionalGeneration"], model_type="qwen3_vl_moe")
        cfg["text_config"].update(model_type="qwen3_vl_moe_text", num_experts=experts, num_experts_per_tok=top_k,
                                  moe_intermediate_size=moe_inter, decoder_sparse_step=1, mlp_only_layers=[],
                                  norm_topk_prob=True)
        cfg["vision_config"]["model_type"] = "qwen3_vl_moe_vision"
    return cfg


def _dense_config(r: dict, dtype: str) -> dict:
    hidden, inter, layers, heads, kv = r["text"]
    depth, v_hidden, v_inter, out = r["vision"]
    torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": r["tie"],
        "torch_dtype": torch_dtype,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": 151936,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": 128,
            "hidden_act": "silu",
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_theta": 5000000,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "tie_word_embeddings": r["tie"],
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "torch_dtype": torch_dtype,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "depth": depth,
            "hidden_size": v_hidden,
            "intermediate_size": v_inter,
            "num_heads": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "in_channels": 3,
            "out_hidden_size": out,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": r["deepstack"],
            "initializer_range": 0.02,
        },
    }


def parameter_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """{key: shape} of what save_pretrained writes, from the HF model on the meta device (no storage)."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**json.loads(json.dumps(cfg)))
    model_cls = getattr(transformers, cfg["architectures"][0])
    with torch.device("meta"):
        model = model_cls(config)
    # named_parameters() lists a tied parameter once (under embed_tokens), as save_pretrained does.
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
    persistent = {k for k in model.state_dict()}
    shapes.update({k: tuple(b.shape) for k, b in model.named_buffers() if k in persistent})
    # MoE experts: the releases store gate_up_proj [E, C, 2I] and down_proj [E, I, C], the transpose of the
    # in-memory parameters; HF's loader transposes them back (its `Transpose(1, 2, check_dims=True)` conversion:
    # only when the stored shape differs from the parameter's).
    for k, shape in shapes.items():
        if k.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            shapes[k] = (shape[0], shape[2], shape[1])
    return shapes


def _fill(name: str, shape) -> str:
    if len(shape) == 1 and "norm" in name and not name.endswith(".bias"):
        return "norm"
    return "normal"


def write_checkpoint(cfg: dict, out_dir: str | Path, dtype: str = "bf16", shard_gb: float = 2.0,
                     seed: int = 0, progress=print) -> Path:
    import torch

    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = parameter_shapes(cfg)
    itemsize = torch.empty(0, dtype=tdtype).element_size()

    # Plan shards greedily in key order (like save_pretrained), max shard_gb each.
    limit = int(shard_gb * 1e9)
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = _numel(shape) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes

    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL, generator=gen).to(tdtype)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            nbytes = _numel(shapes[key]) * itemsize
            header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * ((-len(hbytes)) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for key in keys:
                _write_tensor(f, _numel(shapes[key]), _fill(key, shapes[key]), pool, gen, tdtype)
                weight_map[key] = fname
        total += offset
        progress(f"  {fname}: {len(keys)} tensors, {offset / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _copy_processor_files(out)
    return out


def _write_tensor(f, numel: int, fill: str, pool, gen, tdtype) -> None:
    import torch

    done = 0
    while done < numel:
        n = min(CHUNK, numel - done, POOL)
        start = int(torch.randint(0, POOL - n + 1, (1,), generator=gen))
        x = pool[start:start + n]
        x = (1.0 + 0.1 * x) if fill == "norm" else x * 0.02
        f.write(memoryview(x.to(tdtype).contiguous().view(torch.uint8).numpy()))
        done += n


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _copy_processor_files(out: Path) -> None:
    """Tokenizer / processor / generation configs as demo_checkpoint writes them (best effort)."""
    try:
        from qwen_vl_trt.export import demo_checkpoint as dc

        (out / "preprocessor_config.json").write_text(json.dumps(dc.QWEN3_VL_PREPROCESSOR, indent=2))
        (out / "video_preprocessor_config.json").write_text(json.dumps(dc.QWEN3_VL_VIDEO_PREPROCESSOR, indent=2))
        (out / "generation_config.json").write_text(json.dumps(dc.QWEN3_VL_GENERATION, indent=2))
        dc._write_tokenizer(out, "qwen3_vl")
    except Exception as e:  # not needed for the export
        print(f"  (tokenizer/processor files not copied: {e})", file=sys.stderr)


def check_keys() -> int:
    """Keys and shapes from the meta model == what save_pretrained writes (tiny config, tied and untied),
    and a tiny checkpoint written by this script loads in HF with no missing/unexpected keys."""
    import tempfile

    import torch
    import transformers
    from safetensors import safe_open

    from qwen_vl_trt.export import demo_checkpoint as dc

    failures = 0
    for family, tie in [(f, t) for f in ("qwen3_vl", "qwen3_vl_moe") for t in (False, True)]:
        cfg = json.loads(json.dumps(dc.FAMILIES[family][0]))
        cfg["tie_word_embeddings"] = tie
        with tempfile.TemporaryDirectory() as tmp:  # demo MoE checkpoints hold the release expert layout too
            ref_dir = dc.make_checkpoint(Path(tmp) / "ref", family, tie_word_embeddings=tie, dtype="bfloat16")
            ref = {}
            for p in sorted(ref_dir.glob("*.safetensors")):
                with safe_open(str(p), framework="pt") as f:
                    ref.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            ours = parameter_shapes(cfg)
            same = ours == ref
            print(f"{family} tie={tie}: {len(ours)} keys from the meta model, {len(ref)} from save_pretrained: "
                  f"{'identical (names and shapes)' if same else 'DIFFERENT'}")
            if not same:
                failures += 1
                print("  only meta:", sorted(set(ours) - set(ref))[:10])
                print("  only save_pretrained:", sorted(set(ref) - set(ours))[:10])
                print("  shape differs:", [k for k in set(ours) & set(ref) if ours[k] != ref[k]][:10])
            mine = write_checkpoint(cfg, Path(tmp) / "mine", "bf16", shard_gb=0.01, progress=lambda m: None)
            model, info = transformers.AutoModelForImageTextToText.from_pretrained(
                mine, dtype=torch.bfloat16, output_loading_info=True)
            bad = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
                {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
            print(f"{family} tie={tie}: from_pretrained of our tiny checkpoint: {bad or 'no missing/unexpected keys'}")
            failures += bool(bad)
    return 1 if failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", choices=sorted(RELEASED))
    ap.add_argument("out_dir", nargs="?")
    ap.add_argument("--dtype", default="bf16", choices=sorted(ST_DTYPES))
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-layers", type=int, default=None, help="keep the first N text layers (default: all)")
    ap.add_argument("--vision-depth", type=int, default=None, help="keep N vision blocks (default: all)")
    ap.add_argument("--check-keys", action="store_true", help="compare key names with save_pretrained and exit")
    args = ap.parse_args(argv)
    if args.check_keys:
        return check_keys()
    if not args.config or not args.out_dir:
        ap.error("CONFIG_NAME and OUT_DIR are required")
    t0 = time.perf_counter()
    cfg = released_config(args.config, args.dtype, args.text_layers, args.vision_depth)
    out = write_checkpoint(cfg, args.out_dir, args.dtype, args.shard_gb, args.seed)
    print(f"wrote random Qwen3-VL-{args.config} checkpoint to {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
