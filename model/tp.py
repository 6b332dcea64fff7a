"""Which part of the decoder rank r of N tensor-parallel ranks holds: `TensorParallel` (index ranges), `check`
(whether a model splits over N ranks) and `rank_spec` (the ModelSpec a rank's graph is written for and checked
against). Shared by export/tp.py, which writes the rank graphs, and runtime/backends/tp.py, which runs them; the
split itself is tabled in export/tp.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import CheckpointError
from .spec import ModelSpec

TP_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class TensorParallel:
    """Rank `rank` of `size` ranks; `chunk`, `kv_heads` and `vocab` give the index ranges it holds."""

    rank: int
    size: int

    @property
    def active(self) -> bool:
        return self.size > 1

    def chunk(self, n: int) -> tuple[int, int]:
        """[lo, hi) of an evenly split dim of size n (n % size == 0, checked by `check`)."""
        step = n // self.size
        return self.rank * step, (self.rank + 1) * step

    def kv_heads(self, hkv: int) -> tuple[int, int]:
        """[lo, hi) of the KV heads this rank holds: an even split, or the single head r*Hkv//N when N > Hkv."""
        if self.size <= hkv:
            return self.chunk(hkv)
        head = self.rank * hkv // self.size
        return head, head + 1

    def vocab(self, v: int) -> tuple[int, int]:
        """[lo, hi) of the vocabulary rows (ceil(V/N) per rank; the last rank may hold fewer)."""
        step = -(-v // self.size)
        return min(v, self.rank * step), min(v, (self.rank + 1) * step)


def check(spec: ModelSpec, size: int) -> None:
    """Whether `spec`'s decoder splits over `size` ranks; a CheckpointError line saying why not."""
    t = spec.text
    if size not in TP_SIZES:
        raise CheckpointError(f"--tp {size}: use one of {', '.join(map(str, TP_SIZES))}")
    problems = []
    if t.num_attention_heads % size:
        problems.append(f"{t.num_attention_heads} attention heads")
    if t.num_key_value_heads % size and size % t.num_key_value_heads:
        problems.append(f"{t.num_key_value_heads} KV heads (neither divides the other)")
    dense = [i for i in range(t.num_hidden_layers) if t.moe is None or not t.moe.is_sparse(i)]
    if dense and t.intermediate_size % size:
        problems.append(f"intermediate_size {t.intermediate_size}")
    if t.moe is not None and t.moe.moe_intermediate_size % size:
        problems.append(f"moe_intermediate_size {t.moe.moe_intermediate_size}")
    if problems:
        raise CheckpointError(f"--tp {size}: {spec.model_type} cannot be split evenly over {size} ranks: "
                              f"{', '.join(problems)} not divisible by {size}")


def rank_spec(spec: ModelSpec, tp: TensorParallel) -> ModelSpec:
    """`spec` as rank `tp.rank` sees it: heads, KV heads and intermediate widths per rank (vocab stays whole:
    the logits are gathered)."""
    if not tp.active:
        return spec
    t = spec.text
    lo, hi = tp.kv_heads(t.num_key_value_heads)
    moe = t.moe and dataclasses.replace(t.moe, moe_intermediate_size=t.moe.moe_intermediate_size // tp.size)
    text = dataclasses.replace(t, num_attention_heads=t.num_attention_heads // tp.size, num_key_value_heads=hi - lo,
                               intermediate_size=t.intermediate_size // tp.size, moe=moe)
    return dataclasses.replace(spec, text=text)
