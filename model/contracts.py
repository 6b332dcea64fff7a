"""The I/O contracts of the three graphs and the limits of their dynamic dims, held once as data.

The exporters name their graph inputs/outputs from these specs, the engine builder derives optimization
profiles from them, the runtime allocates buffers and checks feeds against them, and a test ties the
exported ONNX files and the docstring tables of vision.py / embed.py / decoder.py to them.

Dimension alphabet (named dynamic dims in the ONNX files):
  num_patches   T  patches of all images/frames in one vision call (a multiple of merge_unit = 4)
  num_merged    M  merged visual tokens = T / 4 (0 for a text-only prompt)
  num_frames_1  F+1  entries of cu_seqlens: one segment per image or temporal patch of a video
  num_windows_1 W+1  entries of cu_window_seqlens (Qwen2.5-VL)
  batch         B  sequences in one decoder call
  seq           S  new tokens per sequence in this step (prefill: prompt length; decode: 1)
  cache_len     K  capacity of the KV cache (max context of this run)
Fixed dims come from the model spec: C text hidden, Hkv kv heads, D head dim, V vocab, Ld DeepStack levels.
`DT` is the export dtype (float32 | float16 | bfloat16); logits are always float32.

`Limits` bound the dynamic dims (`dim_ranges`): the engines' optimization profiles are made from them
(export/build_engines.py), manifest.json records them, and the runtime refuses a request beyond them on every
backend. Which extra vision inputs a graph has is its family's (model/families.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import CheckpointError

DT = "DT"  # placeholder resolved to the export dtype


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" | "int64" | "int32" | "DT"
    dims: tuple  # ints are fixed, strings are named dynamic dims
    doc: str = ""

    def resolve(self, dtype: str) -> "TensorSpec":
        return TensorSpec(self.name, dtype if self.dtype == DT else self.dtype, self.dims, self.doc)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def resolve(self, dtype: str) -> "GraphSpec":
        return GraphSpec(self.name, tuple(t.resolve(dtype) for t in self.inputs),
                         tuple(t.resolve(dtype) for t in self.outputs))

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def markdown(self) -> str:
        rows = ["| I/O | name | dtype | shape | meaning |", "|---|---|---|---|---|"]
        for kind, specs in (("in", self.inputs), ("out", self.outputs)):
            for t in specs:
                rows.append(f"| {kind} | `{t.name}` | {t.dtype} | [{', '.join(map(str, t.dims))}] | {t.doc} |")
        return "\n".join(rows)


def vision_contract(spec) -> GraphSpec:  # spec: a ModelSpec (model/spec.py)
    v, c = spec.vision, spec.text.hidden_size
    inputs = [TensorSpec("pixel_values", "float32", ("num_patches", v.patch_dim),
                         "flattened patches in HF order (merge-block major), rows (C, Tp, P, P)"),
              *spec.family.vision_inputs]
    inputs += [TensorSpec("rotary_pos_ids", "int64", ("num_patches", 2), "(row, col) of each patch for 2-D RoPE"),
               TensorSpec("cu_seqlens", "int32", ("num_frames_1",),
                          "cumulative patch counts: one attention segment per image / temporal patch")]
    outputs = [TensorSpec("vision_features", DT, ("num_merged", c), "merged features, one row per pad token")]
    if spec.num_deepstack:
        outputs.append(TensorSpec("deepstack_features", DT, (spec.num_deepstack, "num_merged", c),
                                  "DeepStack merger outputs, one level per deepstack_visual_indexes entry"))
    return GraphSpec("vision", tuple(inputs), tuple(outputs))


def embed_contract(spec) -> GraphSpec:  # spec: a ModelSpec (model/spec.py)
    c = spec.text.hidden_size
    inputs = [TensorSpec("input_ids", "int64", ("batch", "seq"), "token ids incl. image/video pad tokens"),
              TensorSpec("vision_features", DT, ("num_merged", c),
                         "rows in the order of the pad tokens in input_ids (row-major over batch); M may be 0")]
    outputs = [TensorSpec("inputs_embeds", DT, ("batch", "seq", c), "token embeddings, pads replaced by vision rows")]
    if spec.num_deepstack:
        inputs.append(TensorSpec("deepstack_features", DT, (spec.num_deepstack, "num_merged", c),
                                 "DeepStack rows, same order as vision_features"))
        outputs.append(TensorSpec("deepstack_embeds", DT, (spec.num_deepstack, "batch", "seq", c),
                                  "DeepStack features at the visual positions, zeros elsewhere"))
    return GraphSpec("embed", tuple(inputs), tuple(outputs))


def decoder_contract(spec) -> GraphSpec:  # spec: a ModelSpec (model/spec.py)
    t = spec.text
    cache_dims = ("batch", t.num_key_value_heads, "cache_len", t.head_dim)
    inputs = [TensorSpec("inputs_embeds", DT, ("batch", "seq", t.hidden_size), "from embed.onnx")]
    if spec.num_deepstack:
        inputs.append(TensorSpec("deepstack_embeds", DT, (spec.num_deepstack, "batch", "seq", t.hidden_size),
                                 "added to the hidden states after decoder layers 0..Ld-1"))
    inputs += [
        TensorSpec("position_ids", "int64", (3, "batch", "seq"), "MRoPE positions (t, h, w) per token"),
        TensorSpec("past_lengths", "int64", ("batch",), "tokens already in the cache per sequence"),
        TensorSpec("logits_index", "int64", ("batch",), "position in seq whose logits are returned (last valid)"),
    ]
    outputs = [TensorSpec("logits", "float32", ("batch", t.vocab_size), "next-token logits")]
    for i in range(t.num_hidden_layers):
        inputs += [TensorSpec(f"past_key.{i}", DT, cache_dims, f"layer {i} key cache"),
                   TensorSpec(f"past_value.{i}", DT, cache_dims, f"layer {i} value cache")]
        outputs += [TensorSpec(f"present_key.{i}", DT, cache_dims,
                               f"layer {i} key cache with rows past_lengths..past_lengths+seq-1 written"),
                    TensorSpec(f"present_value.{i}", DT, cache_dims, f"layer {i} value cache, same rows")]
    return GraphSpec("decoder", tuple(inputs), tuple(outputs))


CONTRACTS = {"vision": vision_contract, "embed": embed_contract, "decoder": decoder_contract}


@dataclass(frozen=True)
class Limits:
    max_patches: int = 16384  # patches per vision call (a 2048x2048 image is 16384 patches of 16 px)
    max_frames: int = 64  # images + temporal patches per vision call
    max_batch: int = 4
    max_seq: int = 4096  # tokens per prefill call per sequence
    max_cache_len: int = 8192  # context capacity (prompt + generated)

    def check(self) -> None:
        for k, v in asdict(self).items():
            if v < 1:
                raise CheckpointError(f"limit {k}={v} is impossible: it must be >= 1")
        if self.max_cache_len < self.max_seq:
            raise CheckpointError(f"max_cache_len {self.max_cache_len} < max_seq {self.max_seq}: a prompt of "
                                  f"max_seq tokens would not fit the cache; raise --max-cache-len")
        if self.max_patches % 4:
            raise CheckpointError(f"max_patches {self.max_patches} must be a multiple of 4 (2x2 merge blocks)")


def dim_ranges(limits: Limits) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each named dynamic dim; opt is the shape TensorRT tunes for."""
    lim = limits
    return {
        "num_patches": (4, min(1024, lim.max_patches), lim.max_patches),
        "num_merged": (0, min(256, lim.max_patches // 4), lim.max_patches // 4),
        "num_frames_1": (2, 2, lim.max_frames + 1),
        "num_windows_1": (2, 17, lim.max_patches // 4 + 1),
        "batch": (1, 1, lim.max_batch),
        "seq": (1, min(256, lim.max_seq), lim.max_seq),
        "cache_len": (16, min(1024, lim.max_cache_len), lim.max_cache_len),
    }
