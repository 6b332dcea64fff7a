"""Weight formats per group of text-decoder weights: what `--weights` asks for, recorded in the graphs' metadata
(`qwen_vl.weights`) and in manifest.json (`graphs.<name>.weights`).

| group | HF weights | formats |
|---|---|---|
| `attention` | `self_attn.{q,k,v,o}_proj` | dense, fp8, int4 |
| `mlp` | the dense MLP's `mlp.{gate,up,down}_proj` | dense, fp8, int4 |
| `experts` | the MoE experts (stacked `gate_up_proj` [E, C, 2I], `down_proj` [E, I, C]) | dense, fp8, int4 |
| `lm_head` | `lm_head` (or the embedding table when tied) | dense, fp8, int4, int8 |
| `embedding` | `embed_tokens` in embed.onnx | dense (docs/graphs.md, "Quantized weights": why the table stays dense) |

Formats (weight-only: activations stay in the graph dtype unless `int4_activations` says int8):
- `dense`: the export dtype (a quantized checkpoint is dequantized as it is read, export/quantized.py);
- `fp8`: float8 e4m3 with one scale per block of 128 along K (input features). A Qwen FP8 checkpoint keeps its
  own bytes and scales (no re-quantization); a bf16 checkpoint is quantized round-to-nearest per block
  (scale = amax / 448);
- `int4`: symmetric round-to-nearest, one scale per block of `int4_block` along K (export/int4.py);
- `int8`: symmetric per output channel.

The router and the vision tower always stay dense (quantizing the vision tower is the usual accuracy complaint).

`--weights` grammar: `dense` | `fp8` | `int4` | `GROUP=FORMAT[,GROUP=FORMAT...]`, where a shorthand may be the
first item and later items override it (`int4,lm_head=int8`). The shorthands:
- `fp8`: every projection (attention, mlp, experts); lm_head and the embedding stay dense, as in Qwen's FP8
  releases;
- `int4`: everything a decode step reads (attention, mlp, experts, lm_head); the embedding table stays dense
  (embed.onnx gathers a few rows per step: its bytes are not read per token).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .errors import UserError

GROUPS = ("attention", "mlp", "experts", "lm_head", "embedding")
FORMATS = {"attention": ("dense", "fp8", "int4"), "mlp": ("dense", "fp8", "int4"),
           "experts": ("dense", "fp8", "int4"), "lm_head": ("dense", "fp8", "int4", "int8"),
           "embedding": ("dense",)}
SHORTHANDS = {"dense": {}, "fp8": {"attention": "fp8", "mlp": "fp8", "experts": "fp8"},
              "int4": {"attention": "int4", "mlp": "int4", "experts": "int4", "lm_head": "int4"}}
INT4_BLOCK_SIZES = (16, 32, 64, 128)
FP8_BLOCK = 128
INT4_ACTIVATIONS = ("fp32", "int8")  # ONNX Runtime MatMulNBits accuracy level 1 (exact product) / 4 (int8)
ACCURACY_LEVEL = {"fp32": 1, "int8": 4}  # int4_activations -> MatMulNBits `accuracy_level`
# The INT4 block when --int4-block-size is not given, for both activation types, so one INT4 export serves both
# (trt-run --int4-activations picks at run time): the group size of the field's INT4 checkpoints (AWQ / GPTQ g128),
# one of the two TensorRT documents for INT4, and the faster one on the CPU for a decode step with either activation
# type (docs/benchmarks.md "MatMulInt4 reads at the memory's pace"; block 32 stores 18 % more bytes a weight).
DEFAULT_INT4_BLOCK = 128
METADATA_KEY = "qwen_vl.weights"  # ONNX metadata key of decoder.onnx / embed.onnx: json.dumps(to_json())
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class WeightFormats:
    attention: str = "dense"
    mlp: str = "dense"
    experts: str = "dense"
    lm_head: str = "dense"
    embedding: str = "dense"
    int4_block: int = 128
    int4_activations: str = "fp32"

    @classmethod
    def parse(cls, text: str, int4_block: int | None = None, int4_activations: str = "fp32") -> "WeightFormats":
        """`--weights TEXT` (grammar in the module docstring) -> WeightFormats; a UserError names what is wrong.
        `int4_block` None: DEFAULT_INT4_BLOCK (128)."""
        if int4_block is None:
            int4_block = DEFAULT_INT4_BLOCK
        chosen: dict[str, str] = {}
        for i, item in enumerate(p.strip() for p in (text or "dense").split(",")):
            if item in SHORTHANDS and i == 0:
                chosen.update(SHORTHANDS[item])
                continue
            group, eq, fmt = item.partition("=")
            if not eq or group not in FORMATS:
                raise UserError(f"--weights {text!r}: {item!r} is not dense, fp8, int4 or GROUP=FORMAT with GROUP "
                                f"one of {', '.join(GROUPS)}")
            if fmt not in FORMATS[group]:
                raise UserError(f"--weights {text!r}: {group} can be {', '.join(FORMATS[group])}, not {fmt!r}")
            chosen[group] = fmt
        formats = cls(**chosen, int4_block=int4_block, int4_activations=int4_activations)
        formats.check()
        return formats

    def check(self) -> None:
        if self.int4_block not in INT4_BLOCK_SIZES:
            raise UserError(f"--int4-block-size {self.int4_block}: use one of {INT4_BLOCK_SIZES}")
        if self.int4_activations not in INT4_ACTIVATIONS:
            raise UserError(f"--int4-activations {self.int4_activations!r}: use fp32 or int8")
        for group in GROUPS:
            if getattr(self, group) not in FORMATS[group]:
                raise UserError(f"weight format {group}={getattr(self, group)!r}: use one of "
                                f"{', '.join(FORMATS[group])}")

    def group_of(self, key: str) -> str | None:
        """The group of an HF Linear key (`model.language_model.layers.3.self_attn.q_proj`), None outside the groups
        (vision, router). MoE experts are not Linear keys: export/moe.py asks for `experts` itself."""
        leaf = key.rsplit(".", 1)[-1]
        if ".visual." in key or key.startswith("visual."):
            return None
        if leaf in _ATTENTION:
            return "attention"
        if leaf in _MLP and ".experts." not in key:
            return "mlp"
        if leaf == "lm_head" or key == "lm_head":
            return "lm_head"
        return None

    def format_of(self, key: str) -> str:
        group = self.group_of(key)
        return "dense" if group is None else getattr(self, group)

    @property
    def is_dense(self) -> bool:
        return all(getattr(self, g) == "dense" for g in GROUPS)

    @property
    def uses_int4(self) -> bool:
        return any(getattr(self, g) == "int4" for g in GROUPS)

    def describe(self) -> str:
        """One line for metadata and logs: `dense`, or `attention=int4-b128,mlp=int4-b128,...` (dense groups left
        out; `+int8-activations` when asked)."""
        if self.is_dense:
            return "dense"
        items = [f"{g}={self._tag(getattr(self, g))}" for g in GROUPS if getattr(self, g) != "dense"]
        if self.uses_int4 and self.int4_activations == "int8":
            items.append("int4_activations=int8")
        return ",".join(items)

    def _tag(self, fmt: str) -> str:
        return {"fp8": f"fp8-e4m3-b{FP8_BLOCK}", "int4": f"int4-sym-b{self.int4_block}", "int8": "int8-sym-channel"}[fmt]

    @property
    def accuracy_level(self) -> int:
        """ONNX Runtime MatMulNBits accuracy level for `int4_activations`: 1 = fp32 activations (the product is
        x @ (q * s) up to summation order), 4 = activations rounded to int8 per block (faster on CPUs, lossy)."""
        return ACCURACY_LEVEL[self.int4_activations]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | str | None) -> "WeightFormats":
        """manifest.json's `weights` entry; older manifests wrote a string (`dense`, `int4-rtn-sym-b128`)."""
        if not data or data == "dense":
            return cls()
        if isinstance(data, str):
            if data.startswith("int4-rtn-sym-b"):  # format of the first --weights int4 (projections only)
                return cls(attention="int4", mlp="int4", int4_block=int(data.rsplit("b", 1)[1]))
            raise UserError(f"unknown weight format {data!r} in manifest.json")
        known = {k: data[k] for k in asdict(cls()) if k in data}
        formats = cls(**known)
        formats.check()
        return formats

    def with_(self, **changes) -> "WeightFormats":
        return replace(self, **changes)
