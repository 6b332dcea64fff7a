"""OpenAI-compatible HTTP server on the `trt-run` pipeline (standard library HTTP, no torch).

    python -m qwen_vl_trt.runtime.serve.server --model-dir ARTIFACTS [--host 127.0.0.1] [--port 8000]

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (request fields:
runtime/serve/openai_protocol.py; `stream: true` answers with server-sent events ending in `data: [DONE]`).
Each request is prepared on its own handler thread; one worker thread runs the model: by default requests join
the running batch at the next decode step (runtime/serve/engine_worker.py, runtime/scheduler.py); `--batching static`
batches requests that arrive together and runs each batch to its end (runtime/serve/serving.py). A bad request gets an
OpenAI error object (`{"error": {"message", "type", "param", "code"}}`) with a 4xx status (400; 404 for another
model name; 408, 413, 415, 421, 503 for the limits of runtime/serve/http_guard.py), a failure of ours 500, and the server
goes on. Images come inline as data URLs or as file:// paths inside the directory the operator allows
(runtime/serve/local_media.py); nothing is fetched from the network. A non-streaming client that hangs up is noticed
while it waits and its generation is cancelled (either worker frees its place at its next step).
Startup errors (artifacts, port) print one `error:` line and exit 2, as `trt-run` does.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from qwen_vl_trt.model.errors import ImageError, PromptTooLong, UserError, VideoError

from . import http_guard, local_media
from . import openai_protocol as api
from .http_guard import ServerLimits
from .openai_protocol import MediaPolicy, ProtocolError

_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
POLL_S = 0.1  # how often a waiting non-streaming handler checks that its client is still connected


class OpenAIServer(ThreadingHTTPServer):
    """The listening socket (bound on construction), the model and its worker."""

    daemon_threads = True
    request_queue_size = http_guard.BACKLOG  # socketserver's default of 5 resets bursts of connections

    def __init__(self, address, limits: ServerLimits = ServerLimits(), media: MediaPolicy = MediaPolicy()):
        self.scheduler, self.quiet = None, False  # before binding: a failed bind calls server_close()
        self.limits, self.media = limits, media
        self.slots = threading.BoundedSemaphore(limits.max_concurrent)
        self.deadlines = http_guard.ReadDeadlines(limits.read_timeout)
        super().__init__(address, Handler)

    def attach(self, model, name: str, max_batch: int, batching: str = "inflight") -> None:
        """`batching`: "inflight" (runtime/serve/engine_worker.py: requests join the running batch at every step) or
        "static" (runtime/serve/serving.py Scheduler: each batch of `generate` runs to its end)."""
        from ..pipeline import Preprocessor
        from ..structured import Grammars

        self.model, self.name, self.created = model, name, int(time.time())
        self.pre = Preprocessor(model.manifest)
        self.grammars = Grammars(self.pre.tokenizer, model.spec.text.vocab_size, model.manifest.eos_token_ids)
        if batching == "static":
            from .serving import Scheduler

            self.scheduler = Scheduler(model, self.pre.tokenizer, max_batch)
        else:
            from .engine_worker import EngineWorker

            self.scheduler = EngineWorker(model, self.pre.tokenizer, max_batch)

    def server_close(self) -> None:
        super().server_close()
        if self.scheduler is not None:
            self.scheduler.close()

    def handle_error(self, request, client_address) -> None:
        kind, err, _ = sys.exc_info()
        if not issubclass(kind, _GONE):  # a client that hung up is not news
            print(f"error: request from {client_address[0]}: {kind.__name__}: {err}", file=sys.stderr)

    def max_new_tokens(self, request, prompt_tokens: int) -> int:
        """`max_tokens` of a request, or the default (runtime/request.py) within the KV cache left after the
        prompt."""
        cache = self.model.manifest.limits.max_cache_len
        room = cache - prompt_tokens
        requested = request.max_new_tokens
        if requested is None:
            requested = min(request.new_tokens(self.model.manifest.generation_config), max(room, 1))
        if requested > room:
            raise PromptTooLong(f"prompt has {prompt_tokens} tokens and max_tokens is {requested}: together they "
                                f"exceed the {cache}-token cache of the artifacts; lower max_tokens or re-export "
                                "with a larger --max-cache-len")
        return requested


class Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    server_version = "qwen-vl-trt"
    protocol_version = "HTTP/1.1"  # keep-alive: a client's requests share one connection

    def setup(self) -> None:
        self.timeout = self.server.limits.read_timeout  # every recv and send (StreamRequestHandler.setup)
        self.check_client_at = 0.0  # when `_next_event` next looks for a hang-up
        super().setup()

    def handle_one_request(self) -> None:
        self.server.deadlines.arm(self.connection)  # disarmed once the request is read
        try:
            super().handle_one_request()
        finally:
            self.server.deadlines.disarm(self.connection)

    def log_message(self, format, *args) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self.server.deadlines.disarm(self.connection)
        path = self.path.split("?")[0].rstrip("/")
        try:
            http_guard.check_host(self.headers, self.server.server_address[0])
        except ProtocolError as e:
            self._error(e)
            return
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._json(200, api.models_list(self.server.name, self.server.created))
        elif path == f"/v1/models/{self.server.name}":
            self._json(200, api.models_list(self.server.name, self.server.created)["data"][0])
        else:
            self._error(ProtocolError(f"no route GET {path}", status=404, code="not_found"))

    def _not_allowed(self) -> None:
        """Other standard methods: 405 (a browser's CORS preflight, OPTIONS, gets no Access-Control-* header)."""
        self.body_read = False
        self._error(ProtocolError(f"method {self.command} is not allowed; use GET or POST", status=405,
                                  code="method_not_allowed"))

    do_HEAD = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_allowed

    def do_POST(self) -> None:
        self.body_read = False  # until it is, an error response closes the connection (the body is unread)
        path = self.path.split("?")[0].rstrip("/")
        if path != "/v1/chat/completions":
            self._error(ProtocolError(f"no route POST {path}", status=404, code="not_found"))
            return
        self.server.deadlines.disarm(self.connection)  # waiting for a slot is not the client being slow
        if not self.server.slots.acquire(timeout=self.server.limits.queue_timeout):
            self._error(ProtocolError("the server is busy; retry later", status=503, code="server_busy",
                                      kind="server_error"))
            return
        self.server.deadlines.arm(self.connection)  # the body, within the read timeout
        try:
            self._guarded_chat()
        finally:
            self.server.slots.release()

    def _guarded_chat(self) -> None:
        try:
            self._chat()
        except ProtocolError as e:
            self._error(e)
        except PromptTooLong as e:
            self._error(ProtocolError(str(e), "messages", code="context_length_exceeded"))
        except UserError as e:
            self._error(ProtocolError(str(e)))
        except _GONE:
            pass
        except Exception as e:  # a bug: this request fails, the server goes on
            traceback.print_exc(file=sys.stderr)
            self._error(ProtocolError(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error"))

    # ---- chat completions ------------------------------------------------------------------------------
    def _chat(self) -> None:
        from . import choices

        body = self._body()
        model = body.get("model") if isinstance(body, dict) else None
        if model is not None and model != self.server.name:
            raise ProtocolError(f"model {model!r} is not served here; GET /v1/models lists {self.server.name!r}",
                                "model", status=404, code="model_not_found")
        req = api.parse_chat_request(body, self.server.media)
        prepared = self._prepare(req.request)
        jobs = choices.jobs(prepared, self.server.max_new_tokens(req.request, prepared.num_tokens), req.request,
                            self.server.grammars)
        for job in jobs:  # n choices: one sequence each, one event queue and cancel flag for all
            self.server.scheduler.submit(job)
        out = choices.Choices(req.n, self.server.pre.tokenizer, api.completion_id(), self.server.name)
        (self._stream if req.stream else self._whole)(jobs[0], req, prepared.num_tokens, out)

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

    def _next_event(self, job) -> tuple:
        """The job's next event; cancels the job (the worker drops it at its next step) if the client has hung
        up, which is checked every POLL_S seconds however fast the events come."""
        while True:
            now = time.monotonic()
            if now >= self.check_client_at:
                self.check_client_at = now + POLL_S
                if http_guard.client_gone(self.connection):
                    job.cancelled.set()
                    raise ConnectionAbortedError("the client closed the connection")
            try:
                return job.events.get(timeout=POLL_S)
            except queue.Empty:
                pass

    def _whole(self, job, req, prompt_tokens: int, out) -> None:
        while not out.done:
            event = self._next_event(job)
            if event[0] == "error":
                job.cancelled.set()  # the other choices
                raise ProtocolError(event[2], status=event[1], kind=_error_kind(event[1]))
            out.add(event)
        self._json(200, out.response(prompt_tokens))

    def _stream(self, job, req, prompt_tokens: int, out) -> None:
        event = self._next_event(job)
        if event[0] == "error":  # nothing sent yet: a plain error response
            job.cancelled.set()
            raise ProtocolError(event[2], status=event[1], kind=_error_kind(event[1]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True  # the stream ends when the connection does
        try:
            for c in out.first_chunks():
                self._event(c)
            while True:
                if event[0] == "error":
                    job.cancelled.set()
                    self._event(api.error_body(event[2], _error_kind(event[1])))
                    break
                for c in out.chunks(event):
                    self._event(c)
                if out.done:
                    if req.include_usage:
                        self._event(api.chunk(out.cid, out.model, None, use=out.usage(prompt_tokens)))
                    break
                event = job.events.get()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except _GONE:
            job.cancelled.set()  # the worker stops generating for it

    # ---- plumbing ---------------------------------------------------------------------------------------
    def _body(self):
        http_guard.check_host(self.headers, self.server.server_address[0])
        http_guard.require_json(self.headers)
        length = http_guard.content_length(self.headers, self.server.limits.max_body)
        raw = http_guard.read_body(self.rfile, length)
        self.body_read = True
        self.server.deadlines.disarm(self.connection)
        return http_guard.parse_json(raw)

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ProtocolError) -> None:
        unread = self.command != "GET" and not getattr(self, "body_read", False)
        if unread:
            self.close_connection = True  # the unread body must not be taken for the next request
        try:
            self._json(e.status, e.body())
            self.wfile.flush()
            if unread:
                http_guard.discard_unread(self.rfile, self.connection, self.server.limits.max_body)
        except _GONE:
            pass


def _error_kind(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m qwen_vl_trt.runtime.serve.server", description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="artifacts",
                    help="artifact directory from export_all.sh (default: artifacts)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    ap.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto",
                    help="auto: TensorRT engines when present and runnable, else ONNX Runtime")
    ap.add_argument("--ort-graphs", choices=("fused", "plugin"), default="fused",
                    help="ONNX Runtime backend: fused = vision/decoder.ort.onnx (default), "
                         "plugin = the TensorRT graphs")
    ap.add_argument("--max-batch", type=int, help="most requests generated at once (default: the artifacts' max batch)")
    ap.add_argument("--batching", choices=("inflight", "static"), default="inflight",
                    help="inflight (default): requests join and leave the running batch at every decode step; "
                         "static: each batch runs to its end while new requests wait (the old behaviour)")
    ap.add_argument("--served-model-name", help="model id in /v1/models and requests (default: the artifacts "
                                                "directory's name)")
    default = ServerLimits()
    ap.add_argument("--allowed-local-media-path", metavar="DIR",
                    help="let requests name file:// images and videos inside DIR (default: none; data URLs only)")
    ap.add_argument("--max-images-per-request", type=int, default=api.MAX_IMAGES,
                    help=f"most images in one request (default: {api.MAX_IMAGES})")
    ap.add_argument("--max-body-mb", type=float, default=default.max_body / (1 << 20),
                    help=f"largest request body in MiB (default: {default.max_body >> 20})")
    ap.add_argument("--max-concurrent-requests", type=int,
                    help="requests being read, prepared, queued or generated at once; others wait up to "
                         f"--queue-timeout, then get 503 (default: 2 x max batch, at least {default.max_concurrent})")
    ap.add_argument("--queue-timeout", type=float, default=default.queue_timeout,
                    help=f"seconds a request waits for one of those slots (default: {default.queue_timeout:g})")
    ap.add_argument("--read-timeout", type=float, default=default.read_timeout,
                    help="seconds a client may take to send a whole request, or stay idle between requests "
                         f"(default: {default.read_timeout:g})")
    return ap


def limits_from_args(args: argparse.Namespace, max_batch: int) -> tuple[ServerLimits, MediaPolicy]:
    """The resource limits and media policy of the flags; UserError for a value out of range. Requests in flight
    default to two batches (one generating, one being prepared)."""
    concurrent = args.max_concurrent_requests or max(2 * max_batch, ServerLimits().max_concurrent)
    checks = (("--max-images-per-request", args.max_images_per_request, 1),
              ("--max-body-mb", args.max_body_mb, 1 / (1 << 20)),
              ("--max-concurrent-requests", concurrent, 1),
              ("--read-timeout", args.read_timeout, 0.01), ("--queue-timeout", args.queue_timeout, 0))
    for flag, value, least in checks:
        if not value >= least:
            raise UserError(f"{flag} {value}: must be at least {least:g}")
    try:
        local = local_media.LocalMediaPolicy.allowing(args.allowed_local_media_path)
    except ValueError as e:
        raise UserError(str(e)) from None
    limits = ServerLimits(int(args.max_body_mb * (1 << 20)), concurrent, args.read_timeout, args.queue_timeout)
    return limits, MediaPolicy(local, args.max_images_per_request)


def make_server(args: argparse.Namespace) -> OpenAIServer:
    """Bind the port, load the model, start the worker. UserError / OSError on failure."""
    from qwen_vl_trt.model.manifest import load_manifest

    from ..generate import load_model

    limit = load_manifest(args.model_dir).limits.max_batch
    max_batch = limit if args.max_batch is None else args.max_batch
    if not 1 <= max_batch <= limit:
        raise UserError(f"--max-batch {max_batch}: must be in [1, {limit}] (the artifacts' max batch); re-export "
                        "with a larger --max-batch")
    limits, media = limits_from_args(args, max_batch)
    try:  # the port first: a port in use is known before minutes of model loading
        server = OpenAIServer((args.host, args.port), limits, media)
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}; pick another --port") from None
    try:
        model = load_model(args.model_dir, args.backend, ort_fused=args.ort_graphs == "fused")
        server.attach(model, args.served_model_name or Path(args.model_dir).resolve().name, max_batch,
                      getattr(args, "batching", "inflight"))  # a Namespace built by hand may lack it
    except BaseException:
        server.server_close()
        raise
    return server


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        server = make_server(args)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    from ..backends.ort_cuda import providers_line

    print(f"serving {server.name!r} ({server.model.backend}: {providers_line(server.model.sessions)}) at "
          f"http://{host}:{port}/v1", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
