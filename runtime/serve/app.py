"""The ASGI application of `qwen-vl-serve` (Starlette, served by uvicorn: runtime/serve/server.py).

| route | answer |
|---|---|
| `GET /health` | `{"status": "ok"}` |
| `GET /v1/models`, `GET /v1/models/{name}` | the served model |
| `POST /v1/chat/completions` | runtime/serve/openai_protocol.py; `stream: true` -> server-sent events, `data: [DONE]` last |
| `POST /v1/completions` | runtime/serve/completions_protocol.py, the same way |
| `GET /metrics` | Prometheus text format (runtime/serve/metrics.py) |

A POST is checked in this order, each refusal an OpenAI error object: Host (421) and Content-Type (415) and
Content-Length (400 / 413: runtime/serve/http_guard.py) from the headers; then one of `max_concurrent` request
slots, waited for at most `queue_timeout` (503); then the body, read within `read_timeout` (408); then the JSON and
its fields (400 / 404). An error sent before the body was read closes the connection, so the unread body is never
taken for a next request. The request is prepared (media, chat template) on a worker thread of the event loop and
submitted to the model's worker (runtime/serve/engine_worker.py or serving.py); its events come back through
`LoopEvents`. A client that disconnects (uvicorn's `http.disconnect`, runtime/serve/http_protocol.py for
half-close) has its generation cancelled, streaming or not: the worker frees its slot at its next step.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import sys
import time
import traceback

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwen_vl_trt.model.errors import ImageError, PromptTooLong, UserError, VideoError

from . import completions_protocol as cmpl
from . import http_guard, local_media
from . import openai_protocol as api
from .log_text import loggable
from .metrics import failure_reason
from .openai_protocol import ProtocolError

access_log = logging.getLogger("qwen_vl_trt.server.access")


class LoopEvents(queue.Queue):
    """A job's event queue (runtime/serve/serving.py `Job.events`) that also wakes the event loop: the worker
    thread puts, a coroutine awaits `ready`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self.loop, self.ready, self.gone = loop, asyncio.Event(), False

    def _put(self, item) -> None:
        super()._put(item)
        self.loop.call_soon_threadsafe(self.ready.set)

    async def next(self):
        """The next event, or None once the client has gone (`gone`, set by the disconnect watcher)."""
        while True:
            try:
                return self.get_nowait()
            except queue.Empty:
                pass
            if self.gone:
                return None
            self.ready.clear()
            if self.empty() and not self.gone:
                await self.ready.wait()


class _Endpoint:
    """How one generating route reads its request and writes its answer."""

    def __init__(self, parse, whole, delta, last, usage_chunk, first=None):
        self.parse, self.whole, self.delta, self.last, self.usage_chunk = parse, whole, delta, last, usage_chunk
        self.first = first  # the chunk that opens a stream, or None


CHAT = _Endpoint(
    parse=api.parse_chat_request,
    whole=lambda name, text, reason, use: api.completion(api.completion_id(), name, text, reason, use),
    delta=lambda cid, name, text: api.chunk(cid, name, {"content": text}),
    last=lambda cid, name, reason: api.chunk(cid, name, {}, reason),
    usage_chunk=lambda cid, name, use: api.chunk(cid, name, None, use=use),
    first=lambda cid, name: api.chunk(cid, name, {"role": "assistant", "content": ""}))
COMPLETIONS = _Endpoint(
    parse=cmpl.parse_completion_request,
    whole=lambda name, text, reason, use: cmpl.text_completion(cmpl.completion_id(), name, text, reason, use),
    delta=lambda cid, name, text: cmpl.text_completion(cid, name, text, None),
    last=lambda cid, name, reason: cmpl.text_completion(cid, name, "", reason),
    usage_chunk=lambda cid, name, use: cmpl.text_completion(cid, name, None, None, use))


def build_app(server) -> Starlette:
    """The app of an OpenAIServer (runtime/serve/server.py: model, worker, limits, media policy, metrics)."""
    handlers = Handlers(server)
    routes = [Route("/health", handlers.health, methods=["GET"]),
              Route("/v1/models", handlers.models, methods=["GET"]),
              Route("/v1/models/{name:path}", handlers.model, methods=["GET"]),
              Route("/metrics", handlers.metrics, methods=["GET"]),
              Route("/v1/chat/completions", handlers.chat, methods=["POST"]),
              Route("/v1/completions", handlers.completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: handlers.http_exception})
    app.router.redirect_slashes = False
    return AccessLog(app, server)


class Handlers:
    def __init__(self, server):
        self.server = server
        self.slots = asyncio.Semaphore(server.limits.max_concurrent)

    # ---- GET ---------------------------------------------------------------------------------------------
    def _host(self, request: Request) -> Response | None:
        try:
            http_guard.check_host(request.headers, self.server.server_address[0])
        except ProtocolError as e:
            return error_response(e, close=True)
        return None

    async def health(self, request: Request) -> Response:
        return self._host(request) or JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return self._host(request) or JSONResponse(api.models_list(self.server.name, self.server.created))

    async def model(self, request: Request) -> Response:
        refused = self._host(request)
        if refused or request.path_params["name"] != self.server.name:
            return refused or error_response(ProtocolError(f"no route GET {loggable(request.url.path, 100)}",
                                                           status=404, code="not_found"))
        return JSONResponse(api.models_list(self.server.name, self.server.created)["data"][0])

    async def metrics(self, request: Request) -> Response:
        refused = self._host(request)
        if refused:
            return refused
        body, kind = self.server.metrics.exposition()
        return Response(body, headers={"Content-Type": kind})

    async def http_exception(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's 404 (no route) and 405 (a route, another method) as OpenAI error objects."""
        if exc.status_code == 405:
            e = ProtocolError(f"method {request.method} is not allowed; use GET or POST", status=405,
                              code="method_not_allowed")
        else:
            e = ProtocolError(f"no route {request.method} {loggable(request.url.path, 100)}",
                              status=exc.status_code, code="not_found")
        return error_response(e, close=_has_body(request))

    # ---- POST --------------------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, COMPLETIONS)

    async def _generate(self, request: Request, endpoint: _Endpoint) -> Response:
        arrived, metrics = time.monotonic(), self.server.metrics
        try:
            http_guard.check_host(request.headers, self.server.server_address[0])
            http_guard.require_json(request.headers)
            http_guard.content_length(request.headers, self.server.limits.max_body)
        except ProtocolError as e:
            metrics.failed(failure_reason(e.status))
            return error_response(e, close=True)
        try:
            await asyncio.wait_for(self.slots.acquire(), self.server.limits.queue_timeout)
        except TimeoutError:
            metrics.failed("busy")
            return error_response(ProtocolError("the server is busy; retry later", status=503, code="server_busy",
                                                kind="server_error"), close=True)
        release, body_read = True, False
        try:
            body = http_guard.parse_json(await self._body(request))  # the raw bytes are freed here
            body_read = True
            req = self._parse(body, endpoint)
            del body  # neither the bytes nor the JSON stay resident while media decode and generation run
            job, prompt_tokens = await self._submit(req)
            first = await self._first_event(request, job)
            if first is None:
                metrics.failed("client_gone")
                return Response(status_code=499)  # nobody reads it: uvicorn drops it on a closed connection
            if first[0] == "error":
                raise ProtocolError(first[2], status=first[1], kind=_error_kind(first[1]))
            if req.stream:
                release = False  # the stream releases its slot when it ends
                return self._stream(job, req, prompt_tokens, first, endpoint, arrived)
            if endpoint is CHAT:  # n choices, logprobs: runtime/serve/choices.py
                return await self._whole_chat(request, job, req, prompt_tokens, first, arrived)
            return await self._whole(request, job, prompt_tokens, first, endpoint, arrived)
        except ProtocolError as e:
            metrics.failed(failure_reason(e.status))
            return error_response(e, close=not body_read)
        except ClientDisconnect:
            metrics.failed("client_gone")
            return Response(status_code=499)
        except Exception as e:  # a bug: this request fails, the server goes on
            traceback.print_exc(file=sys.stderr)
            metrics.failed("server_error")
            return error_response(ProtocolError(f"internal error: {type(e).__name__}: {e}", status=500,
                                                kind="server_error"), close=not body_read)
        finally:
            if release:
                self.slots.release()

    async def _body(self, request: Request) -> bytes:
        """The whole body within the read timeout (Request.stream, not Request.body: that one keeps a copy on
        the request for the request's lifetime)."""
        async def read() -> bytes:
            return b"".join([chunk async for chunk in request.stream()])

        try:
            return await asyncio.wait_for(read(), self.server.limits.read_timeout)
        except TimeoutError:
            raise ProtocolError(f"the request body did not arrive within {self.server.limits.read_timeout:g} s",
                                status=408, code="request_timeout") from None

    def _parse(self, body, endpoint: _Endpoint):
        model = body.get("model") if isinstance(body, dict) else None
        if model is not None and model != self.server.name:
            raise ProtocolError(f"model {model!r} is not served here; GET /v1/models lists {self.server.name!r}",
                                "model", status=404, code="model_not_found")
        req = endpoint.parse(body, self.server.media)
        if endpoint is not CHAT and req.request.n != 1:
            raise ProtocolError(f"n: only n=1 is supported by /v1/completions, got {req.request.n}", "n")
        return req

    async def _submit(self, req):
        """Prepare (on a thread: media decoding, tokenizing; a structured output's grammar compiled) and submit one
        job per choice (runtime/serve/choices.py) -> (the first job, prompt tokens). The jobs share one event
        queue, which wakes this loop, and one cancel flag."""
        from . import choices

        try:
            prepared = await asyncio.to_thread(self._prepare, req.request)
            max_new = self.server.max_new_tokens(req.request, prepared.num_tokens)
            jobs = await asyncio.to_thread(choices.jobs, prepared, max_new, req.request, self.server.grammars,
                                           LoopEvents(asyncio.get_running_loop()))
        except PromptTooLong as e:
            raise ProtocolError(str(e), "messages", code="context_length_exceeded") from None
        except UserError as e:
            raise ProtocolError(str(e)) from None
        for job in jobs:
            self.server.scheduler.submit(job)
        return jobs[0], prepared.num_tokens

    def _prepare(self, request):
        """The pipeline's preprocessing; local media that does not decode gets local_media's one message (a video
        is always local; an image error is about an inline image when it names one, `<image i>`)."""
        local = [p for p in (*request.images, request.video) if isinstance(p, str)]
        try:
            return self.server.pre.prepare(request)
        except (ImageError, VideoError) as e:
            if not local or (isinstance(e, ImageError) and "<image " in str(e)):
                raise
            local_media.log_unusable(", ".join(local), str(e))
            raise ProtocolError(local_media.UNUSABLE, "messages") from None

    async def _first_event(self, request: Request, job):
        """The job's first event, watching for a hang-up meanwhile (None: the client went, the job is
        cancelled)."""
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            return await job.events.next()
        finally:
            watcher.cancel()

    async def _whole(self, request: Request, job, prompt_tokens: int, event, endpoint: _Endpoint,
                     arrived: float) -> Response:
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        pieces = []
        try:
            while event[0] == "delta":
                pieces.append(event[1])
                event = await job.events.next()
                if event is None:
                    self.server.metrics.failed("client_gone")
                    return Response(status_code=499)
        finally:
            watcher.cancel()
        if event[0] == "error":
            raise ProtocolError(event[2], status=event[1], kind=_error_kind(event[1]))
        use = api.usage(prompt_tokens, event[2])
        self.server.metrics.finished(arrived, job.token_times, prompt_tokens, event[2], event[1])
        return JSONResponse(endpoint.whole(self.server.name, "".join(pieces), event[1], use))

    async def _whole_chat(self, request: Request, job, req, prompt_tokens: int, event, arrived: float) -> Response:
        """The chat completion of every choice (runtime/serve/choices.py: `n`, logprobs)."""
        from .choices import Choices

        out = Choices(req.n, self.server.pre.tokenizer, api.completion_id(), self.server.name)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            while True:
                if event[0] == "error":
                    job.cancelled.set()  # the other choices
                    raise ProtocolError(event[2], status=event[1], kind=_error_kind(event[1]))
                out.add(event)
                if out.done:
                    break
                event = await job.events.next()
                if event is None:
                    self.server.metrics.failed("client_gone")
                    return Response(status_code=499)
        finally:
            watcher.cancel()
        self.server.metrics.finished(arrived, job.token_times, prompt_tokens, sum(out.tokens), out.reasons[0])
        return JSONResponse(out.response(prompt_tokens))

    def _stream(self, job, req, prompt_tokens: int, event, endpoint: _Endpoint, arrived: float) -> Response:
        from .choices import Choices

        name, cid = self.server.name, (api.completion_id() if endpoint is CHAT else cmpl.completion_id())
        metrics, state = self.server.metrics, {"open": True}
        out = Choices(req.n, self.server.pre.tokenizer, cid, name) if endpoint is CHAT else None

        def end(outcome: str | None) -> None:
            """Once: release the slot, cancel an unfinished job, count the outcome."""
            if state["open"]:
                state["open"] = False
                self.slots.release()
                if outcome is None:
                    job.cancelled.set()
                    metrics.failed("client_gone")
                elif outcome != "done":
                    metrics.failed(outcome)

        async def events():
            nonlocal event
            outcome = None
            try:
                if out is not None:
                    for c in out.first_chunks():
                        yield sse(c)
                elif endpoint.first is not None:
                    yield sse(endpoint.first(cid, name))
                while True:
                    if out is not None and event[0] != "error":  # chat: n choices, logprobs
                        for c in out.chunks(event):
                            yield sse(c)
                        if out.done:
                            if req.include_usage:
                                yield sse(endpoint.usage_chunk(cid, name, out.usage(prompt_tokens)))
                            metrics.finished(arrived, job.token_times, prompt_tokens, sum(out.tokens),
                                             out.reasons[0])
                            outcome = "done"
                            break
                    elif event[0] == "delta":
                        yield sse(endpoint.delta(cid, name, event[1]))
                    elif event[0] == "error":
                        job.cancelled.set()  # the other choices
                        yield sse(api.error_body(event[2], _error_kind(event[1])))
                        outcome = failure_reason(event[1])
                        break
                    else:
                        yield sse(endpoint.last(cid, name, event[1]))
                        if req.include_usage:
                            yield sse(endpoint.usage_chunk(cid, name, api.usage(prompt_tokens, event[2])))
                        metrics.finished(arrived, job.token_times, prompt_tokens, event[2], event[1])
                        outcome = "done"
                        break
                    event = await job.events.next()
                yield b"data: [DONE]\n\n"
            finally:
                end(outcome)

        return StreamingResponse(events(), headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
                                 background=_Background(lambda: end(None)))


class _Background:
    """A StreamingResponse background task (run after the stream, also when the client went before the
    stream's generator ever ran) that calls a plain function."""

    def __init__(self, fn):
        self.fn = fn

    async def __call__(self) -> None:
        self.fn()


async def _watch_disconnect(request: Request, job) -> None:
    """Wait for uvicorn's `http.disconnect` (the body is already read): cancel the job and wake its waiter."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled.set()
            job.events.gone = True
            job.events.ready.set()
            return


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def error_response(e: ProtocolError, close: bool = False) -> Response:
    """The OpenAI error object of `e`; `close`: end the connection after it (a body may be left unread)."""
    data = json.dumps(e.body(), ensure_ascii=False).encode("utf-8", "backslashreplace")
    headers = {"Content-Type": "application/json"}
    if close:
        headers["Connection"] = "close"
    return Response(data, status_code=e.status, headers=headers)


def _has_body(request: Request) -> bool:
    return request.headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in request.headers


def _error_kind(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


class AccessLog:
    """ASGI middleware: one access-log line per response, `client "METHOD path" status`, the path escaped and cut
    (loggable): a `%0A` or a 100 KB path cannot forge or flood log lines. Silent when the server is
    `quiet`."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.server.quiet:
            return await self.app(scope, receive, send)

        async def logged_send(message):
            if message["type"] == "http.response.start":
                client = scope.get("client") or ("-", 0)
                access_log.info('%s "%s %s" %d', client[0], scope["method"], loggable(scope["path"]),
                                message["status"])
            await send(message)

        return await self.app(scope, receive, logged_send)
