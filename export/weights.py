"""Lazy access to a checkpoint's safetensors weights, one tensor at a time.

Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`) checkpoints, any of
fp32/fp16/bf16, and FP8 / AWQ checkpoints (export/quantized.py: a quantized weight is returned dequantized, fp32).
Nothing is read until `get(key)` is called, and only that tensor is materialized, so exporting a 64 GB checkpoint needs memory for its largest tensor, not for the model
(docs/benchmarks.md, "Export: time and peak RSS").
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from .quantized import AwqWeights, Fp8Weights, is_fp8, weight_quantization
from qwen_vl_trt.model.errors import CheckpointError


def canonical_key(key: str) -> str:
    """The in-memory (transformers 5.x) name of a stored weight: what the exporters ask for.

    Released Qwen2.5-VL checkpoints (and transformers 5.x `save_pretrained`, which writes the same layout) store
    `visual.*` and `model.{embed_tokens,layers,norm}.*`; in memory these are `model.visual.*` and
    `model.language_model.*` (HF conversion_mapping, Qwen2VLForConditionalGeneration). Qwen3-VL checkpoints
    already use the in-memory names, which this leaves unchanged.
    """
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    return key


class CheckpointWeights:
    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self._dtypes: dict[str, str] = {}  # stored name -> safetensors dtype ("BF16", "F8_E4M3", ...)
        stored = self._index()
        self.quant = weight_quantization(_config(self.dir), str(self.dir / "config.json"))
        self._stored_key = {canonical_key(k): k for k in stored}  # canonical name -> name in the file
        self._key_to_file = {canonical_key(k): p for k, p in stored.items()}
        # AWQ: "X.weight" -> "X", made from X.qweight / X.qzeros / X.scales
        self._awq = self.quant.weight_keys(self._key_to_file) if isinstance(self.quant, AwqWeights) else {}
        self._check_fp8_scales()

    def _check_fp8_scales(self) -> None:
        """Every float8 weight has its scale, checked from the headers before anything is exported."""
        for stored, dtype in self._dtypes.items():
            if not dtype.startswith("F8_"):
                continue
            key = canonical_key(stored)
            scale_key = self.quant.scale_key(key) if isinstance(self.quant, Fp8Weights) else None
            if scale_key is None or scale_key not in self._key_to_file:
                raise CheckpointError(f"{self.dir}: weight {key!r} is stored as {dtype} without a scale "
                                      f"({scale_key or 'config.json has no quantization_config'})")

    def _index(self) -> dict[str, Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = {f: self.dir / f for f in set(weight_map.values())}
            missing = sorted(f for f, p in files.items() if not p.is_file())
            if missing:
                raise CheckpointError(f"{self.dir}: shard(s) listed in {index.name} are missing: {', '.join(missing)}")
            for p in files.values():
                self._dtypes.update(_check_safetensors_file(p))
            return {k: files[f] for k, f in weight_map.items()}
        shards = sorted(self.dir.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.dir}: no *.safetensors weights found")
        out: dict[str, Path] = {}
        for p in shards:
            dtypes = _check_safetensors_file(p)
            self._dtypes.update(dtypes)
            for key in dtypes:
                out[key] = p
        return out

    def keys(self) -> list[str]:
        """Weight names (scales and packed AWQ tensors are read with their weight, so they are not listed)."""
        return [k for k in self._key_to_file if not (self.quant and self.quant.is_auxiliary(k))] + list(self._awq)

    def has(self, key: str) -> bool:
        return key in self._key_to_file or key in self._awq

    def resolve(self, *candidates: str) -> str:
        """The first candidate key present (checkpoints of different transformers versions name keys differently)."""
        for key in candidates:
            if self.has(key):
                return key
        raise CheckpointError(f"{self.dir}: weight {candidates[0]!r} not found in the checkpoint")

    def get(self, key: str):
        """One tensor as a torch.Tensor in its stored dtype (an FP8 or AWQ weight: dequantized, float32)."""
        if key in self._awq:
            layer = self._awq[key]
            return self.quant.dequantize(*(self._read(f"{layer}.{n}") for n in ("qweight", "qzeros", "scales")), key)
        t = self._read(key)
        if not is_fp8(t):
            return t
        return self.quant.dequantize(t, self._read(self.quant.scale_key(key)), key)  # scale checked at open

    def get_fp8(self, key: str):
        """A weight as the checkpoint stores it, not dequantized: (q float8_e4m3fn [R, C], scale [sr, sc] in its
        stored dtype, (bm, bn)) with W[i, j] = q[i, j] * scale[i // bm, j // bn] (export/quantized.py); None when
        `key` is not stored as 2-D e4m3 with a block scale this checkpoint describes (dense, AWQ, stacked experts,
        e5m2). For `--weights fp8` (export/fp8.py), which keeps these bytes and scales exactly."""
        import torch

        if key in self._awq or not isinstance(self.quant, Fp8Weights) or key not in self._key_to_file:
            return None
        if self._dtypes.get(self._stored_key[key]) != "F8_E4M3":
            return None
        q = self._read(key)
        if q.ndim != 2 or q.dtype != torch.float8_e4m3fn:
            return None
        scale = self._read(self.quant.scale_key(key))  # present: checked at open
        return (q, *self.quant.block_grid(q, scale, key))

    def fp8_experts(self, key: str, spec):
        """A stacked expert tensor as an FP8 checkpoint stores it, turned to release layout: (q e4m3 [E, K, N],
        grid [E, ceil(K/bk), ceil(N/bn)] in its stored dtype, (bk, bn)) with W[e, k, n] = q[e, k, n] *
        grid[e, k // bk, n // bn]; None when it is not block-scaled e4m3 (dense, per-tensor/channel scales).
        `spec`: the ModelSpec whose MoE shapes tell HF's in-memory layout [E, N, K] from the release one."""
        import torch

        quant = self.quant
        if not isinstance(quant, Fp8Weights):
            return None
        q = self.stored(key)  # `get` would dequantize it
        if not is_fp8(q) or q.dtype != torch.float8_e4m3fn or q.ndim != 3:
            return None
        grid = self.stored(quant.scale_key(key))
        if grid.ndim != 3 or grid.shape[0] != q.shape[0]:
            return None  # per-tensor / per-channel scales: not a block grid
        e, r, c = q.shape
        bm, bn = quant.block or (-(-r // grid.shape[1]), -(-c // grid.shape[2]))
        if (-(-r // bm), -(-c // bn)) != tuple(grid.shape[1:]):
            raise CheckpointError(f"{key}: scale grid {list(grid.shape)} does not match weight {list(q.shape)} in "
                                  f"blocks of {[bm, bn]}")
        moe, hidden = spec.text.moe, spec.text.hidden_size
        name = key.rsplit(".", 1)[-1]
        release_k = hidden if name == "gate_up_proj" else moe.moe_intermediate_size
        in_memory = (e, 2 * moe.moe_intermediate_size, hidden) if name == "gate_up_proj" else \
            (e, hidden, moe.moe_intermediate_size)
        if tuple(q.shape) == in_memory:  # HF's in-memory [E, N, K]: K is the second block axis
            return q.transpose(1, 2), grid.transpose(1, 2), (bn, bm)
        if r == release_k:
            return q, grid, (bm, bn)
        return None  # export/moe.py release_layout() reports the shape error

    def stored(self, key: str):
        """One tensor exactly as the checkpoint stores it (an FP8 weight or its scale: not dequantized)."""
        return self._read(key)

    def _read(self, key: str):
        from safetensors import safe_open

        path = self._key_to_file.get(key)
        if path is None:
            raise CheckpointError(f"{self.dir}: weight {key!r} not found in the checkpoint")
        # Opened per tensor on purpose: a handle kept open keeps the shard's mmapped pages resident, and
        # over a whole export they add up to the model size in RSS (16.6 GiB at 8B; 1.4 GiB this way).
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(self._stored_key[key])
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None


def _config(ckpt_dir: Path) -> dict:
    try:
        return json.loads((ckpt_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # ModelSpec reports a missing or broken config.json; weights alone need none


def _check_safetensors_file(path: Path) -> dict[str, str]:
    """Validate the header and the file size (a truncated download is caught here, not mid-export) -> the
    file's {tensor name: safetensors dtype}."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError("implausible header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    size = path.stat().st_size
    if size < 8 + n + end:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header needs {8 + n + end}); download it again")
    return {k: v.get("dtype", "") for k, v in header.items()}
