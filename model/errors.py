"""Errors the user can fix, one root for export and runtime alike. Every entry point (`trt-run`, `qwen-vl-export`,
the server, Triton, `qwen-vl-request`, ...) catches `UserError`, prints `str(e)` (one line) and exits 2 (or answers
4xx); anything else is a bug.

Each message says what is wrong and what to do, e.g.
`ImageError("image not found: cat.png; check the path")`.
"""
from __future__ import annotations


class UserError(Exception):
    """Base class: bad input or setup that the user can fix. `str(e)` is one line."""


class CheckpointError(UserError):
    """The checkpoint directory (or an export option) cannot be used: the message says what is wrong and where."""


class ImageError(UserError):
    """An image file is missing, empty, corrupt, of an unsupported format or of an unusable shape."""


class VideoError(UserError):
    """A video (file or frame directory) is missing, unreadable, empty or needs a decoder that is not installed."""


class PromptTooLong(UserError):
    """The prompt (text + vision tokens) does not fit the engine's sequence budget."""


class ArtifactError(UserError):
    """A checkpoint / artifact directory lacks a file or holds one that does not parse."""


class BackendUnavailable(UserError):
    """An optional backend (TensorRT, CUDA, PyAV) is not installed or cannot start."""
