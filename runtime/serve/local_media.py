"""Which server-side files a chat request may name (`file://` image and video URLs): none, unless the operator
allows one directory (`qwen-vl-serve --allowed-local-media-path DIR`, as vLLM's flag of that name).

A `file://` URL is used only when its host part is empty or `localhost` and the real path of the file (every
symlink and `..` resolved, `os.path.realpath`) lies inside the real path of the allowed directory; an image must
be a non-empty regular file, a video a regular file or a frame directory. Every other case (outside the
directory, missing, a directory, empty, a device, unreadable, and later a file that does not decode) gets the
one message `UNUSABLE`, so a client learns nothing about the server's files; what was wrong goes to the server
log only. The resolved path is what the pipeline opens.
"""
from __future__ import annotations

import logging
import os
import stat
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .log_text import loggable

log = logging.getLogger("qwen_vl_trt.server")
UNUSABLE = ("this local media cannot be used: it must be a readable image or video file (or frame directory) "
            "inside the server's allowed media directory")
NOT_ALLOWED = ("local media (file://) is not allowed by this server; send images as data:image/...;base64 URLs "
               "(the operator can allow a directory with --allowed-local-media-path)")


class MediaRefused(Exception):
    """`str(e)` is what the client is told (`UNUSABLE` or `NOT_ALLOWED`)."""


@dataclass(frozen=True)
class LocalMediaPolicy:
    allowed_dir: str | None = None  # real path of the directory clients may name files in; None: no local media

    @classmethod
    def allowing(cls, directory: str | None) -> "LocalMediaPolicy":
        """From the operator's flag; ValueError if it is given but is not a directory."""
        if directory is None:
            return cls(None)
        real = os.path.realpath(directory)
        if not os.path.isdir(real):
            raise ValueError(f"--allowed-local-media-path {directory}: not a directory")
        return cls(real)

    def resolve(self, url: str, what: str) -> str:
        """A file:// URL -> the real path to open; MediaRefused if the URL may not be used (module docstring)."""
        if self.allowed_dir is None:
            raise MediaRefused(NOT_ALLOWED)
        if "\x00" in url or "%00" in url:  # os.stat / realpath raise ValueError on a NUL byte
            return _refuse(url, "the URL holds a NUL byte")
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            return _refuse(url, f"host {parts.netloc!r} is not this machine")
        path = os.path.realpath(urllib.request.url2pathname(parts.path))
        if os.path.commonpath([path, self.allowed_dir]) != self.allowed_dir:
            return _refuse(url, f"{path} is outside {self.allowed_dir}")
        try:
            info = os.stat(path)
        except OSError as e:
            return _refuse(url, f"{path}: {e.strerror}")
        regular = stat.S_ISREG(info.st_mode) and info.st_size > 0
        if not (regular or (what == "video" and stat.S_ISDIR(info.st_mode))):
            return _refuse(url, f"{path} is not a non-empty regular file" + (" or directory" if what == "video" else ""))
        if not os.access(path, os.R_OK):
            return _refuse(url, f"{path} is not readable")
        return path


def _refuse(url: str, why: str):
    log.warning("refused local media %s: %s", loggable(url), loggable(why, 400))
    raise MediaRefused(UNUSABLE)


def log_unusable(path: str, detail: str) -> None:
    """A local file that passed `resolve` but did not decode: the detail for the log (the client gets UNUSABLE)."""
    log.warning("unusable local media %s: %s", loggable(path), loggable(detail, 400))
