"""OpenAI-compatible HTTP server on the `trt-run` pipeline: a Starlette app (runtime/serve/app.py) on uvicorn.

    python -m qwen_vl_trt.runtime.serve.server --model-dir ARTIFACTS [--host 127.0.0.1] [--port 8000]

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (request fields:
runtime/serve/openai_protocol.py), `POST /v1/completions` (runtime/serve/completions_protocol.py), `GET /metrics`
(Prometheus, runtime/serve/metrics.py); `stream: true` answers with server-sent events ending in `data: [DONE]`.
HTTP/1.1 is uvicorn's h11 parser (runtime/serve/http_protocol.py adds the header deadline and half-close).
Requests are parsed and prepared on the event loop's worker threads; one worker thread runs the model: by default
requests join the running batch at the next decode step (runtime/serve/engine_worker.py, runtime/scheduler.py);
`--batching static` batches requests that arrive together and runs each batch to its end
(runtime/serve/serving.py). A bad request gets an OpenAI error object (`{"error": {"message", "type", "param",
"code"}}`) with a 4xx status (400; 404 for another model name; 405, 408, 413, 415, 421, 503 for the limits of
runtime/serve/http_guard.py), a failure of ours 500, and the server goes on. Images come inline as data URLs or
as file:// paths inside the directory the operator allows (runtime/serve/local_media.py); nothing is fetched
from the network. A client that hangs up, streaming or not, has its generation cancelled (the worker frees its
place at its next step). Startup errors (artifacts, port) print one `error:` line and exit 2, as `trt-run` does.
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from pathlib import Path

from qwen_vl_trt.model.errors import PromptTooLong, UserError

from . import cache_flags, http_guard, local_media
from . import openai_protocol as api
from .http_guard import ServerLimits
from .openai_protocol import MediaPolicy

SHUTDOWN_GRACE_S = 5.0  # seconds `shutdown` lets open requests finish before cancelling them


class OpenAIServer:
    """The listening socket (bound on construction), the model, its worker and the uvicorn server that serves the
    app. `serve_forever` runs until `shutdown`; `server_close` frees the socket and stops the worker."""

    def __init__(self, address, limits: ServerLimits = ServerLimits(), media: MediaPolicy = MediaPolicy()):
        self.scheduler, self.quiet, self.uvicorn = None, False, None
        self.limits, self.media = limits, media
        self.stopped = threading.Event()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(http_guard.BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()

    def attach(self, model, name: str, max_batch: int, batching: str = "inflight", caches: dict | None = None) -> None:
        """`batching`: "inflight" (runtime/serve/engine_worker.py: requests join the running batch at every step) or
        "static" (runtime/serve/serving.py Scheduler: each batch of `generate` runs to its end). `caches`: the
        in-flight engine's cache sizes (runtime/serve/cache_flags.py; default: on, default sizes)."""
        from ..pipeline import Preprocessor
        from ..structured import Grammars
        from .metrics import ServerMetrics

        self.model, self.name, self.created = model, name, int(time.time())
        self.pre = Preprocessor(model.manifest)
        self.grammars = Grammars(self.pre.tokenizer, model.spec.text.vocab_size, model.manifest.eos_token_ids)
        if batching == "static":
            from .serving import Scheduler

            self.scheduler = Scheduler(model, self.pre.tokenizer, max_batch)
        else:
            from .engine_worker import EngineWorker

            self.scheduler = EngineWorker(model, self.pre.tokenizer, max_batch, **(caches or {}))
        self.metrics = ServerMetrics(name, self.scheduler.load, getattr(self.scheduler, "cache_stats", None))

    def serve_forever(self) -> None:
        """Serve on the bound socket until `shutdown` (or, on the main thread, SIGINT / SIGTERM)."""
        import uvicorn

        from .app import build_app
        from .http_protocol import protocol_class

        config = uvicorn.Config(build_app(self), http=protocol_class(self.limits.read_timeout), lifespan="off",
                                loop="asyncio", access_log=False, log_config=None, log_level=logging.WARNING,
                                timeout_keep_alive=self.limits.read_timeout, backlog=http_guard.BACKLOG,
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S, server_header=False,
                                headers=[("server", "qwen-vl-trt")])
        self.uvicorn = uvicorn.Server(config)
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.stopped.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` (from another thread) and wait for it."""
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True
            self.stopped.wait(timeout=SHUTDOWN_GRACE_S + 10)

    def server_close(self) -> None:
        self.socket.close()
        if self.scheduler is not None:
            self.scheduler.close()

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
    cache_flags.add_arguments(ap)
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

    from .. import media_guard
    from ..generate import load_model

    limit = load_manifest(args.model_dir).limits.max_batch
    max_batch = limit if args.max_batch is None else args.max_batch
    if not 1 <= max_batch <= limit:
        raise UserError(f"--max-batch {max_batch}: must be in [1, {limit}] (the artifacts' max batch); re-export "
                        "with a larger --max-batch")
    limits, media = limits_from_args(args, max_batch)
    caches = cache_flags.sizes(args)
    try:  # the port first: a port in use is known before minutes of model loading
        server = OpenAIServer((args.host, args.port), limits, media)
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}; pick another --port") from None
    media_guard.prestart_in_background()  # the image-decode worker starts while the model loads
    try:
        model = load_model(args.model_dir, args.backend, ort_fused=args.ort_graphs == "fused")
        server.attach(model, args.served_model_name or Path(args.model_dir).resolve().name, max_batch,
                      getattr(args, "batching", "inflight"), caches)  # a Namespace built by hand may lack it
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the access log and local-media refusals
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
