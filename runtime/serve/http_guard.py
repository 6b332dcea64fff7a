"""What runtime/serve/server.py checks before a request reaches the model: resource limits and the request framing.

| resource | bound (qwen-vl-serve flag, default) |
|---|---|
| pending connections | listen backlog `BACKLOG` (128); HTTP/1.1 keep-alive, so a client reuses its connection |
| one request's headers + body | `--read-timeout` (30 s) from the first byte awaited to the last body byte (`ReadDeadlines`) |
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
import select
import socket
import threading
import time
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


def read_body(rfile, length: int) -> bytes:
    """Exactly `length` bytes, or ProtocolError if the client stops sending (timeout or end of stream)."""
    chunks, left = [], length
    try:
        while left:
            chunk = rfile.read1(min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except (TimeoutError, OSError):
        pass
    if left:
        raise ProtocolError(f"the request body ended after {length - left} of {length} bytes", status=408,
                            code="request_timeout")
    return b"".join(chunks)


def discard_unread(rfile, sock: socket.socket, most: int, seconds: float = 1.0) -> None:
    """Read and drop what the client may still be sending (at most `most` bytes, for at most `seconds`) before a
    connection with an unread body is closed: closing with unread data sends a TCP reset, which can destroy the
    error response just sent before the client reads it (the "lingering close" of Apache httpd)."""
    deadline = time.monotonic() + seconds
    try:
        while most > 0 and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = rfile.read1(min(most, 1 << 16))
            if not chunk:
                return
            most -= len(chunk)
    except OSError:
        pass


def client_gone(sock: socket.socket) -> bool:
    """Whether the peer has closed (or reset) its side: readable with nothing to read. Data waiting (a next
    pipelined request) is not a hang-up."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class ReadDeadlines:
    """Shuts down a connection that has not delivered its request within the read timeout (a slow client
    sending a byte a second never trips a per-recv socket timeout). One thread for all connections."""

    def __init__(self, seconds: float):
        self.seconds, self.lock, self.deadlines = seconds, threading.Lock(), {}
        self.thread = threading.Thread(target=self._loop, name="qwen-vl-read-deadlines", daemon=True)
        self.thread.start()

    def arm(self, sock: socket.socket) -> None:
        with self.lock:
            self.deadlines[sock] = time.monotonic() + self.seconds

    def disarm(self, sock: socket.socket) -> None:
        with self.lock:
            self.deadlines.pop(sock, None)

    def _loop(self) -> None:
        while True:
            time.sleep(min(0.25, self.seconds / 4))
            now = time.monotonic()
            with self.lock:
                late = [s for s, t in self.deadlines.items() if t < now]
                for s in late:
                    del self.deadlines[s]
            for s in late:
                try:
                    s.shutdown(socket.SHUT_RD)  # its blocked read returns: 408 (a body) or a quiet close (headers)
                except OSError:
                    pass
