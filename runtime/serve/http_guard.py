"""What the server checks before a request reaches the model: resource limits and the request's headers.

HTTP/1.1 framing (Content-Length rules: a duplicate that disagrees is a 400, RFC 9112 section 6.3; keep-alive,
pipelining) is uvicorn's h11 parser; runtime/serve/http_protocol.py adds the header deadline and half-close, and
runtime/serve/app.py applies these checks and limits in the order its docstring gives.

| resource | bound (qwen-vl-serve flag, default) |
|---|---|
| pending connections | listen backlog `BACKLOG` (128); HTTP/1.1 keep-alive, so a client reuses its connection |
| request line + headers | `--read-timeout` (30 s) from the connection (or the end of the previous response); h11 refuses headers over 16 KiB |
| the body | `--read-timeout` again, from the moment the request has its slot (runtime/serve/app.py) |
| an idle keep-alive connection | the same timeout |
| body bytes | `--max-body-mb` (64 MiB), refused from Content-Length before anything is read |
| requests in flight (read, prepared, queued, generating) | `--max-concurrent-requests` (2 x max batch, >= 8): a |
| | slot is taken before the body is read; a request waits `--queue-timeout` (60 s) for one, then gets 503 |
| images per request | `--max-images-per-request` (16, runtime/serve/openai_protocol.py) |

The request must say `Content-Type: application/json` (415 otherwise: a web page's form or `text/plain` POST,
which browsers send cross-site without asking, is refused) and, when the server listens on a loopback address,
name a loopback `Host` (a DNS-rebinding page names its own). The body must be JSON that Python's `json`
parses without `Infinity`/`NaN`, integers over `sys.get_int_max_str_digits()` or nesting past the recursion
limit: each of those is a 400, never a 500.
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass

from .openai_protocol import ProtocolError

BACKLOG = 128
_LENGTH = re.compile(r"[0-9]{1,15}")  # ASCII digits only: str.isdigit() takes "²", which int() refuses
_LOOPBACK_NAMES = {"localhost", "localhost.", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class ServerLimits:
    max_body: int = 64 << 20  # bytes
    max_concurrent: int = 8  # requests in flight (the server's default: 2 x max batch, at least this)
    read_timeout: float = 30.0  # seconds
    queue_timeout: float = 60.0  # seconds a request waits for a slot before its 503


def content_length(headers, max_body: int) -> int:
    """The Content-Length of a request body; ProtocolError (400 / 413) if it is missing, malformed or too big."""
    length = headers.get("Content-Length")
    if headers.get("Transfer-Encoding") or length is None or not _LENGTH.fullmatch(length.strip()):
        raise ProtocolError("send the request body with a Content-Length header (a decimal number of bytes)")
    n = int(length)
    if n > max_body:
        raise ProtocolError(f"request body of {n} bytes is over the {max_body >> 20} MiB limit",
                            status=413, code="request_too_large")
    return n


def require_json(headers) -> None:
    kind = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ProtocolError(f"Content-Type must be application/json, got {kind[:60]!r}", status=415,
                            code="unsupported_media_type")


def check_host(headers, listen_host: str) -> None:
    """On a loopback listener, the Host header (when sent) must name a loopback address."""
    if not _is_loopback(listen_host):
        return
    host = headers.get("Host")
    if host is None:
        return
    name = host.strip().lower()
    name = name[1:name.index("]")] if name.startswith("[") and "]" in name else name.rsplit(":", 1)[0]
    if not _is_loopback(name):
        raise ProtocolError(f"Host {host[:60]!r} is not this server's address (it listens on {listen_host})",
                            status=421, code="misdirected_request")


def _is_loopback(name: str) -> bool:
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_json(raw: bytes):
    """Request body bytes -> the JSON value; ProtocolError (400) for anything Python's json refuses."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError("the request body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProtocolError(f"the request body is not valid JSON: {reason}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")

