"""The reuse flags of qwen-vl-serve and qwen-vl-triton-repo: the in-flight engine's prefix cache and encoder cache
(runtime/scheduler.py, runtime/prefix_cache.py, runtime/encoder_cache.py), on by default.

`add_arguments(parser)` adds `--no-prefix-cache`, `--prefix-cache-mb MB` and `--encoder-cache-mb MB` (0 turns a
cache off); `sizes(args)` -> the Engine's keyword arguments, UserError for a negative size.
"""
from __future__ import annotations

import argparse

from qwen_vl_trt.model.errors import UserError

from ..scheduler import DEFAULT_ENCODER_CACHE_MB, DEFAULT_PREFIX_CACHE_MB


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="do not reuse the KV rows of earlier requests' prompts (same as --prefix-cache-mb 0)")
    ap.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB, metavar="MB",
                    help="host memory for KV rows that later prompts starting the same way reuse, keyed by token ids "
                         f"and image contents (default {DEFAULT_PREFIX_CACHE_MB}; 0 = off)")
    ap.add_argument("--encoder-cache-mb", type=float, default=DEFAULT_ENCODER_CACHE_MB, metavar="MB",
                    help="host memory for vision features of recent images and videos, keyed by their pixels "
                         f"(default {DEFAULT_ENCODER_CACHE_MB}; 0 = off)")


def sizes(args: argparse.Namespace) -> dict:
    """{"prefix_cache_mb", "encoder_cache_mb"} of the flags (defaults for a Namespace built without them)."""
    prefix = getattr(args, "prefix_cache_mb", DEFAULT_PREFIX_CACHE_MB)
    encoder = getattr(args, "encoder_cache_mb", DEFAULT_ENCODER_CACHE_MB)
    for flag, value in (("--prefix-cache-mb", prefix), ("--encoder-cache-mb", encoder)):
        if not value >= 0:
            raise UserError(f"{flag} {value}: must be >= 0 (0 turns the cache off)")
    return {"prefix_cache_mb": 0 if getattr(args, "no_prefix_cache", False) else prefix, "encoder_cache_mb": encoder}
