"""OpenAI-compatible HTTP server on the `trt-run` pipeline (standard library HTTP, no torch).

    python -m qwen_vl_trt.runtime.server --model-dir ARTIFACTS [--host 127.0.0.1] [--port 8000]

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (request fields:
runtime/openai_protocol.py; `stream: true` answers with server-sent events ending in `data: [DONE]`).
Each request is prepared on its own handler thread; one worker thread runs the model: by default requests join
the running batch at the next decode step (runtime/engine_worker.py, runtime/scheduler.py); `--batching static`
batches requests that arrive together and runs each batch to its end (runtime/serving.py). A bad request gets an
OpenAI error object (`{"error": {"message", "type", "param", "code"}}`) with status 400 (404 for another model
name), a failure of ours 500, and the server goes on. Images come inline as data URLs or as file:// paths on the
server; nothing is fetched from the network. Startup errors (artifacts, port) print one `error:` line and exit 2,
as `trt-run` does.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import openai_protocol as api
from .cli import DEFAULT_MAX_NEW_TOKENS
from .errors import PromptTooLong, UserError
from .openai_protocol import ProtocolError

MAX_BODY = 256 << 20  # bytes of one request (images inline as base64)
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class OpenAIServer(ThreadingHTTPServer):
    """The listening socket (bound on construction), the model and its worker."""

    daemon_threads = True

    def __init__(self, address):
        self.scheduler, self.quiet = None, False  # before binding: a failed bind calls server_close()
        super().__init__(address, Handler)

    def attach(self, model, name: str, max_batch: int, batching: str = "inflight") -> None:
        """`batching`: "inflight" (runtime/engine_worker.py: requests join the running batch at every step) or
        "static" (runtime/serving.py Scheduler: each batch of `generate` runs to its end)."""
        from .pipeline import Preprocessor

        self.model, self.name, self.created = model, name, int(time.time())
        self.pre = Preprocessor(model.manifest)
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

    def max_new_tokens(self, requested: int | None, prompt_tokens: int) -> int:
        """`max_tokens` of a request, or the default within the KV cache left after the prompt."""
        cache = self.model.manifest.limits.max_cache_len
        room = cache - prompt_tokens
        if requested is None:
            default = int(self.model.manifest.generation_config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
            requested = min(default, max(room, 1))
        if requested > room:
            raise PromptTooLong(f"prompt has {prompt_tokens} tokens and max_tokens is {requested}: together they "
                                f"exceed the {cache}-token cache of the artifacts; lower max_tokens or re-export "
                                "with a larger --max-cache-len")
        return requested


class Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    server_version = "qwen-vl-trt"

    def log_message(self, format, *args) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._json(200, api.models_list(self.server.name, self.server.created))
        elif path == f"/v1/models/{self.server.name}":
            self._json(200, api.models_list(self.server.name, self.server.created)["data"][0])
        else:
            self._error(ProtocolError(f"no route GET {path}", status=404, code="not_found"))

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path != "/v1/chat/completions":
            self._error(ProtocolError(f"no route POST {path}", status=404, code="not_found"))
            return
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
        from .pipeline import Request
        from .serving import Job

        body = self._body()
        model = body.get("model") if isinstance(body, dict) else None
        if model is not None and model != self.server.name:
            raise ProtocolError(f"model {model!r} is not served here; GET /v1/models lists {self.server.name!r}",
                                "model", status=404, code="model_not_found")
        req = api.parse_chat_request(body)
        prepared = self.server.pre.prepare(Request(req.conversation, req.images, req.video, None))
        job = Job(prepared, self.server.max_new_tokens(req.max_tokens, prepared.num_tokens), req.sampling,
                  req.stop, req.ignore_eos)
        self.server.scheduler.submit(job)
        (self._stream if req.stream else self._whole)(job, req, prepared.num_tokens)

    def _whole(self, job, req, prompt_tokens: int) -> None:
        pieces = []
        while True:
            event = job.events.get()
            if event[0] == "delta":
                pieces.append(event[1])
            elif event[0] == "error":
                raise ProtocolError(event[2], status=event[1], kind=_error_kind(event[1]))
            else:
                use = api.usage(prompt_tokens, event[2])
                self._json(200, api.completion(api.completion_id(), self.server.name, "".join(pieces), event[1], use))
                return

    def _stream(self, job, req, prompt_tokens: int) -> None:
        event = job.events.get()
        if event[0] == "error":  # nothing sent yet: a plain error response
            raise ProtocolError(event[2], status=event[1], kind=_error_kind(event[1]))
        cid, name = api.completion_id(), self.server.name
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # the stream ends when the connection does
        try:
            self._event(api.chunk(cid, name, {"role": "assistant", "content": ""}))
            while True:
                if event[0] == "delta":
                    self._event(api.chunk(cid, name, {"content": event[1]}))
                elif event[0] == "error":
                    self._event(api.error_body(event[2], _error_kind(event[1])))
                    break
                else:
                    self._event(api.chunk(cid, name, {}, event[1]))
                    if req.include_usage:
                        self._event(api.chunk(cid, name, None, use=api.usage(prompt_tokens, event[2])))
                    break
                event = job.events.get()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except _GONE:
            job.cancelled.set()  # the worker stops generating for it

    # ---- plumbing ---------------------------------------------------------------------------------------
    def _body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ProtocolError("send the request body with a Content-Length header")
        if int(length) > MAX_BODY:
            raise ProtocolError(f"request body of {length} bytes is over the {MAX_BODY >> 20} MiB limit")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ProtocolError(f"the request body is not valid JSON: {e}") from None

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ProtocolError) -> None:
        try:
            self._json(e.status, e.body())
        except _GONE:
            pass


def _error_kind(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m qwen_vl_trt.runtime.server", description=__doc__.splitlines()[0])
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
    return ap


def make_server(args: argparse.Namespace) -> OpenAIServer:
    """Bind the port, load the model, start the worker. UserError / CheckpointError / OSError on failure."""
    from .generate import load_model
    from .manifest import load_manifest

    limit = load_manifest(args.model_dir).limits.max_batch
    max_batch = limit if args.max_batch is None else args.max_batch
    if not 1 <= max_batch <= limit:
        raise UserError(f"--max-batch {max_batch}: must be in [1, {limit}] (the artifacts' max batch); re-export "
                        "with a larger --max-batch")
    try:  # the port first: a port in use is known before minutes of model loading
        server = OpenAIServer((args.host, args.port))
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
    from qwen_vl_trt.export.spec import CheckpointError

    args = parser().parse_args(argv)
    try:
        server = make_server(args)
    except (UserError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving {server.name!r} ({server.model.backend}) at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
