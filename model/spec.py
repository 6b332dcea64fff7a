"""The model spec: everything the graphs, engines and runtime need from a checkpoint's config.json.

All config.json drift is handled here and nowhere else:
- transformers 4.57 writes `rope_scaling`, 5.x writes `rope_parameters` (and Qwen2.5-VL's `type: mrope`);
- `tie_word_embeddings` sits at the top level or inside `text_config`;
- Qwen2.5-VL configs are flat (text keys at the top level), Qwen3-VL configs nest `text_config`.
A key that is missing where the released checkpoints always have it raises `CheckpointError`: the
transformers class defaults match no released model (e.g. `Qwen3VLVisionConfig` defaults to depth 27 and
hidden size 1152, while Qwen3-VL-2B has depth 24 and hidden size 1024).
Which parser reads a config is the family's (model/families.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError
from .families import Family, family_of


@dataclass(frozen=True)
class VisionSpec:
    depth: int
    hidden_size: int  # C_v
    intermediate_size: int
    num_heads: int
    patch_size: int  # P
    temporal_patch_size: int  # 2
    spatial_merge_size: int  # 2
    out_hidden_size: int  # == text hidden C
    in_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    # Qwen3-VL
    num_position_embeddings: int = 0  # learned 2-D table, side = sqrt(n)
    deepstack_visual_indexes: tuple[int, ...] = ()
    # Qwen2.5-VL
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float = 0.0
    rope_theta: float = 10000.0  # in no config: fixed in HF's vision rotary class

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C * T_p * P * P (1536 for Qwen3-VL, 1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def num_grid_per_side(self) -> int:
        return int(round(self.num_position_embeddings**0.5))


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


@dataclass(frozen=True)
class TextSpec:
    vocab_size: int  # V
    hidden_size: int  # C
    intermediate_size: int  # I
    num_hidden_layers: int  # L
    num_attention_heads: int  # Hq
    num_key_value_heads: int  # Hkv
    head_dim: int  # D
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool  # Qwen3-VL: always True (HF ignores the key); Qwen2.5-VL: False
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2.5-VL: q/k/v bias
    qk_norm: bool  # Qwen3-VL: RMSNorm on q and k per head
    hidden_act: str = "silu"
    moe: MoESpec | None = None


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vision: VisionSpec
    text: TextSpec
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    weight_prefixes: dict = field(default_factory=dict)  # role -> checkpoint key prefix

    @property
    def num_deepstack(self) -> int:
        return len(self.vision.deepstack_visual_indexes)

    @property
    def family(self) -> Family:
        """What this model type does its own way (model/families.py)."""
        return family_of(self.model_type)

    @staticmethod
    def from_checkpoint(ckpt_dir: str | Path) -> "ModelSpec":
        path = Path(ckpt_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found (is {ckpt_dir} a Hugging Face checkpoint directory?)")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return ModelSpec.from_config(cfg, source=str(path))

    @staticmethod
    def from_config(cfg: dict, source: str = "config.json") -> "ModelSpec":
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{source}: expected a JSON object")
        family = family_of(cfg.get("model_type"), source)
        return family.load("config_parser")(_Reader(cfg, source))

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


class _Reader:
    """Typed access to one config dict with error messages that name the key path."""

    def __init__(self, cfg: dict, source: str, path: str = ""):
        self.cfg, self.source, self.path = cfg, source, path

    def sub(self, key: str, required: bool = True) -> "_Reader":
        val = self.cfg.get(key)
        if val is None and not required:
            return _Reader({}, self.source, f"{self.path}{key}.")
        if not isinstance(val, dict):
            raise CheckpointError(f"{self.source}: {self.path}{key} missing or not an object")
        return _Reader(val, self.source, f"{self.path}{key}.")

    def has(self, key: str) -> bool:
        return key in self.cfg and self.cfg[key] is not None

    def get(self, key: str, typ: type, default=None):
        if not self.has(key):
            if default is None:
                raise CheckpointError(f"{self.source}: {self.path}{key} missing")
            return default
        val = self.cfg[key]
        try:
            if typ is bool:
                if not isinstance(val, bool):
                    raise TypeError
                return val
            if typ is tuple:
                return tuple(int(v) for v in val)
            if typ is int and (isinstance(val, bool) or int(val) != val):
                raise TypeError
            return typ(val)
        except (TypeError, ValueError):
            raise CheckpointError(f"{self.source}: {self.path}{key} has an invalid value {val!r}") from None


def _rope(r: _Reader) -> tuple[float, tuple[int, ...] | None]:
    """rope_theta and mrope_section from either `rope_parameters` (5.x) or `rope_scaling` + `rope_theta` (4.x)."""
    params = r.cfg.get("rope_parameters") or {}
    scaling = r.cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise CheckpointError(f"{r.source}: {r.path}rope_parameters/rope_scaling must be objects")
    theta = params.get("rope_theta", r.cfg.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{r.source}: {r.path}rope_theta missing (neither rope_parameters nor top level)")
    section = params.get("mrope_section", scaling.get("mrope_section"))
    return float(theta), (tuple(int(s) for s in section) if section is not None else None)


def _text_common(t: _Reader, top: _Reader, *, qk_norm: bool, attention_bias: bool, interleaved: bool) -> dict:
    theta, section = _rope(t)
    if section is None or len(section) != 3:
        raise CheckpointError(f"{t.source}: {t.path}rope mrope_section missing or not 3 values")
    hidden, heads = t.get("hidden_size", int), t.get("num_attention_heads", int)
    head_dim = t.get("head_dim", int, default=hidden // heads)
    if 2 * sum(section) != head_dim:
        raise CheckpointError(f"{t.source}: mrope_section {list(section)} does not cover head_dim {head_dim}")
    # tie_word_embeddings: top level (5.x, Qwen2.5-VL) or inside text_config (4.57 Qwen3-VL); default False.
    tie = top.get("tie_word_embeddings", bool, default=t.get("tie_word_embeddings", bool, default=False))
    return dict(
        vocab_size=t.get("vocab_size", int),
        hidden_size=hidden,
        intermediate_size=t.get("intermediate_size", int),
        num_hidden_layers=t.get("num_hidden_layers", int),
        num_attention_heads=heads,
        num_key_value_heads=t.get("num_key_value_heads", int),
        head_dim=head_dim,
        rms_norm_eps=t.get("rms_norm_eps", float),
        rope_theta=theta,
        mrope_section=section,
        mrope_interleaved=interleaved,
        max_position_embeddings=t.get("max_position_embeddings", int),
        tie_word_embeddings=tie,
        attention_bias=attention_bias,
        qk_norm=qk_norm,
        hidden_act=t.get("hidden_act", str, default="silu"),
    )


def _vision_common(v: _Reader, in_channels: int) -> dict:
    """VisionSpec fields both families spell the same way (required: no class default matches a release)."""
    fields = ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "temporal_patch_size",
              "spatial_merge_size", "out_hidden_size")
    return {**{f: v.get(f, int) for f in fields}, "in_channels": in_channels, "hidden_act": v.get("hidden_act", str)}


def parse_qwen3_vl(top: _Reader) -> ModelSpec:
    return _parse_qwen3_vl(top, moe=False)


def parse_qwen3_vl_moe(top: _Reader) -> ModelSpec:
    return _parse_qwen3_vl(top, moe=True)


def _parse_qwen3_vl(top: _Reader, moe: bool) -> ModelSpec:
    t, v = top.sub("text_config"), top.sub("vision_config")
    text = _text_common(t, top, qk_norm=True, attention_bias=t.get("attention_bias", bool, default=False),
                        interleaved=True)  # HF always interleaves for Qwen3-VL (mrope_interleaved is ignored)
    if moe:
        # released config.json (4.57): num_experts; transformers 5.x save_pretrained: num_local_experts
        experts_key = "num_local_experts" if t.has("num_local_experts") and not t.has("num_experts") else "num_experts"
        text["moe"] = MoESpec(
            num_experts=t.get(experts_key, int),
            num_experts_per_tok=t.get("num_experts_per_tok", int),
            moe_intermediate_size=t.get("moe_intermediate_size", int),
            norm_topk_prob=True,  # HF 5.x always renormalizes the top-k weights
            decoder_sparse_step=t.get("decoder_sparse_step", int, default=1),
            mlp_only_layers=t.get("mlp_only_layers", tuple, default=()),
        )
        if text["moe"].num_experts_per_tok > text["moe"].num_experts:
            raise CheckpointError(f"{t.source}: {t.path}num_experts_per_tok {text['moe'].num_experts_per_tok} > "
                                  f"num_experts {text['moe'].num_experts}")
    vision = VisionSpec(
        **_vision_common(v, in_channels=v.get("in_channels", int, default=3)),
        num_position_embeddings=v.get("num_position_embeddings", int),
        deepstack_visual_indexes=v.get("deepstack_visual_indexes", tuple),
    )
    _check_vision(vision, text, top)
    return ModelSpec(
        model_type="qwen3_vl_moe" if moe else "qwen3_vl",
        vision=vision,
        text=TextSpec(**text),
        **_token_ids(top),
        weight_prefixes={"visual": "model.visual.", "text": "model.language_model.", "lm_head": "lm_head."},
    )


def parse_qwen2_5_vl(top: _Reader) -> ModelSpec:
    # 5.x nests text keys under text_config; 4.x configs are flat. Read from whichever has them.
    t = top.sub("text_config") if top.has("text_config") and "hidden_size" in top.cfg["text_config"] else top
    v = top.sub("vision_config")
    text = _text_common(t, top, qk_norm=False, attention_bias=True, interleaved=False)
    # HF Qwen2_5_VLAttention always uses hidden / heads (a head_dim key would only reach the rotary table).
    if text["head_dim"] != text["hidden_size"] // text["num_attention_heads"]:
        raise CheckpointError(f"{top.source}: {t.path}head_dim {text['head_dim']} != hidden_size / "
                              f"num_attention_heads; Qwen2.5-VL attention always uses hidden_size / heads")
    # A pre-v5 text_config's tie_word_embeddings wins over a False at the top level (HF Qwen2_5_VLConfig BC).
    text["tie_word_embeddings"] = (top.get("tie_word_embeddings", bool, default=False)
                                   or t.get("tie_word_embeddings", bool, default=False))
    vision = VisionSpec(
        **_vision_common(v, in_channels=v.get("in_chans", int, default=v.get("in_channels", int, default=3))),
        window_size=v.get("window_size", int),
        fullatt_block_indexes=v.get("fullatt_block_indexes", tuple),
        tokens_per_second=v.get("tokens_per_second", float),
        # 5.x writes vision_config.rope_parameters {rope_type: axial, rope_theta}; 4.x configs have none (10000)
        rope_theta=v.sub("rope_parameters", required=False).get("rope_theta", float, default=10000.0),
    )
    _check_vision(vision, text, top)
    merged_window = vision.window_size // vision.spatial_merge_size // vision.patch_size
    bad = [i for i in vision.fullatt_block_indexes if not 0 <= i < vision.depth]
    if merged_window < 1 or bad:
        raise CheckpointError(f"{top.source}: vision_config window_size {vision.window_size} / "
                              f"fullatt_block_indexes {list(vision.fullatt_block_indexes)} do not fit patch "
                              f"{vision.patch_size} x merge {vision.spatial_merge_size} / depth {vision.depth}")
    return ModelSpec(
        model_type="qwen2_5_vl",
        vision=vision,
        text=TextSpec(**text),
        **_token_ids(top),
        weight_prefixes={"visual": "model.visual.", "text": "model.language_model.", "lm_head": "lm_head."},
    )


def _token_ids(top: _Reader) -> dict:
    return dict(
        image_token_id=top.get("image_token_id", int),
        video_token_id=top.get("video_token_id", int),
        vision_start_token_id=top.get("vision_start_token_id", int),
        vision_end_token_id=top.get("vision_end_token_id", int),
    )


def _check_vision(vision: VisionSpec, text: dict, top: _Reader) -> None:
    if vision.out_hidden_size != text["hidden_size"]:
        raise CheckpointError(
            f"{top.source}: vision_config.out_hidden_size {vision.out_hidden_size} != text hidden_size "
            f"{text['hidden_size']}"
        )
    if vision.hidden_size % vision.num_heads:
        raise CheckpointError(f"{top.source}: vision hidden_size not divisible by num_heads")
    if text["num_attention_heads"] % text["num_key_value_heads"]:
        raise CheckpointError(f"{top.source}: num_attention_heads not a multiple of num_key_value_heads")
    bad = [i for i in vision.deepstack_visual_indexes if not 0 <= i < vision.depth]
    if bad or len(vision.deepstack_visual_indexes) > text["num_hidden_layers"]:
        raise CheckpointError(f"{top.source}: deepstack_visual_indexes {list(vision.deepstack_visual_indexes)} "
                              f"do not fit depth {vision.depth} / {text['num_hidden_layers']} text layers")
    if vision.num_position_embeddings and vision.num_grid_per_side**2 != vision.num_position_embeddings:
        raise CheckpointError(f"{top.source}: vision num_position_embeddings is not a square")
