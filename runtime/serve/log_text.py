"""Untrusted text (a client's URL path, a file:// path, a decoder's message) made safe for one log line."""
from __future__ import annotations


def loggable(text: str, limit: int = 200) -> str:
    """`text` for one log line: control characters, backslashes and non-ASCII escaped (a `%0A` decoded into a
    path cannot start a forged line), cut to `limit` characters with the full length said."""
    cut = text[:limit].encode("unicode_escape").decode("ascii")
    return cut if len(text) <= limit else f"{cut}... ({len(text)} characters)"
