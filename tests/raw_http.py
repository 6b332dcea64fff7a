"""A raw HTTP/1.1 client for the server tests (any bytes in any header) and the process's peak RSS."""
from __future__ import annotations

import socket
import time
from pathlib import Path


def port(server) -> int:
    return server.server_address[1]


def http(server, body: bytes, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, bytes, float]:
    """One POST /v1/chat/completions on a new connection -> (status, headers, body, seconds to the answer)."""
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body)),
            **(headers or {})}
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items() if v is not None)
    with socket.create_connection(("127.0.0.1", port(server)), timeout=timeout) as s:
        t0 = time.monotonic()
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body)
        return (*read_response(s), time.monotonic() - t0)


def read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    """The final response (an interim 1xx, which RFC 9110 section 15.2 says a client must accept, is skipped)."""
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            assert more, f"connection closed before a response: {data!r}"
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 1"):
            break
        data = rest
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        more = s.recv(65536)
        assert more, "connection closed inside a response body"
        rest += more
    return int(status_line.split()[1]), headers, rest[:length]


def post_bytes(body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> int:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
    return peak_rss()
