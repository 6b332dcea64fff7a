"""uvicorn's h11 connection (HTTP/1.1 framing: Content-Length rules, keep-alive, pipelining) with the two things
it does not do that qwen-vl-serve's limits need: a deadline on a request's headers, and half-close.

- **Header deadline.** uvicorn times out an idle keep-alive connection (`timeout_keep_alive`) but not a client
  that sends its request line and headers a byte at a time. `ReadTimeoutH11Protocol` closes a connection whose
  next request has not delivered its headers within `read_timeout` seconds of the connection opening (or of the
  first byte after the previous response); the body has its own deadline in runtime/serve/app.py.
- **Half-close.** uvicorn's `eof_received` lets asyncio close the transport at the client's FIN, so a client
  that shuts down its write side after its request (allowed by RFC 9112 section 9.6) never gets its answer. Here
  a FIN while a request is being answered keeps the write side open and ends keep-alive after the response.
  A FIN looks the same whether the client half-closed or went away; to tell them apart, a response not yet
  started gets an interim `100 Continue` (RFC 9110 section 15.2: a client must accept unexpected 1xx), and the
  socket's pending error is checked every `PEER_POLL_S`: a client that has closed answers the 100 with a TCP
  reset, and the connection is then aborted, which the app sees as `http.disconnect` and cancels the generation.
  A started response (a stream) needs no probe: its next event gets the reset.

A request that h11 refuses (a malformed request line or header, headers over 16 KiB, a bad Content-Length or two
that disagree: RFC 9112 section 6.3) gets uvicorn's 400 and a closed connection, its body an OpenAI error object
(`MALFORMED`) like every other refusal.
"""
from __future__ import annotations

import json
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .openai_protocol import error_body

PEER_POLL_S = 0.05
MALFORMED = ("malformed HTTP/1.1 request: a bad request line or header, headers over 16 KiB, or a Content-Length "
             "that is not one decimal number")


class ReadTimeoutH11Protocol(H11Protocol):
    read_timeout = 30.0  # seconds; set per server by `protocol_class`

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_deadline = None
        self._peer_watch = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if not self._answering():
            self._arm_header_deadline()  # the first bytes of a next request
        super().data_received(data)
        if self._answering():  # the headers are in: the app takes over (body deadline, slots)
            self._cancel_header_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_header_deadline()
        if self._peer_watch is not None:
            self._peer_watch.cancel()
        super().connection_lost(exc)

    def eof_received(self):
        if not self._answering():
            return None  # between requests: close as uvicorn does
        self.cycle.keep_alive = False  # answer this request, then close
        if not self.cycle.response_started and self.conn.our_state is h11.SEND_RESPONSE:
            self.transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                                          reason=b"Continue")))
        self._peer_watch = self.loop.call_later(PEER_POLL_S, self._check_peer)
        return True  # keep the transport open for writing

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_body(MALFORMED, "invalid_request_error", "bad_request")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response had already started: nothing more can be said
            pass
        self.transport.close()

    # ---- internals ---------------------------------------------------------------------------------------
    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.read_timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self._answering() and not self.transport.is_closing():
            self.transport.close()  # a quiet close, as for an idle keep-alive connection

    def _check_peer(self) -> None:
        self._peer_watch = None
        if self.transport.is_closing() or not self._answering():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.transport.abort()  # the peer reset the connection: connection_lost -> http.disconnect
            return
        self._peer_watch = self.loop.call_later(PEER_POLL_S, self._check_peer)


def protocol_class(read_timeout: float) -> type:
    """The protocol class for one server's `--read-timeout`."""
    return type("ServerH11Protocol", (ReadTimeoutH11Protocol,), {"read_timeout": read_timeout})
