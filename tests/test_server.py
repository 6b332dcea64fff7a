"""The OpenAI-compatible server (runtime/serve/server.py) over HTTP, vs HF `generate` and HF's chat template.

The server runs in this process on an ephemeral port with the tiny Qwen3-VL artifacts of test_generate.py
(export_all.sh, fp32, max batch 2, max seq 512, cache 1024) and is spoken to with urllib and a raw socket.
References are HF's: `model.generate` greedy on inputs from HF's processor, whose `apply_chat_template` gets the
same OpenAI-format messages the server gets (data URLs, string and part contents, system, assistant turns);
texts are compared through HF's tokenizer `decode(skip_special_tokens=True)`. Cases: one image as a data URL,
text only with EOS on (finish_reason from HF's own stop), a file:// image and a frame-directory video,
streaming == whole, stop strings, two requests queued while the model is busy run as one batch == each alone,
the worker's packing (a seeded sampled request runs alone), a system + multi-turn chat with an image, bad
requests -> 400/404 error objects and the server still healthy, a client that hangs up mid-stream, and startup
errors -> one `error:` line, exit 2.
"""
from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from test_generate import N_NEW, artifacts, media, processor  # noqa: F401 (fixtures)

from qwen_vl_trt.runtime.serve.parity import hf_greedy

NAME = "tiny-qwen3-vl"


def serve(artifacts, media, *flags):  # noqa: F811
    """A server on a free port, in this process, with its default limits (clients may name files in the media
    fixture's directory) and `flags`, until the fixture ends."""
    from qwen_vl_trt.runtime.serve.server import make_server, parser

    srv = make_server(parser().parse_args([
        "--model-dir", str(artifacts), "--port", "0", "--backend", "onnxruntime", "--served-model-name", NAME,
        "--allowed-local-media-path", str(media["images"][0].parent), *flags]))
    with serving(srv):
        yield srv


@pytest.fixture(scope="module")
def server(artifacts, media):  # noqa: F811
    yield from serve(artifacts, media)  # the default worker: in-flight batching


@pytest.fixture(scope="module")
def static_server(artifacts, media):  # noqa: F811
    """`--batching static`: the run-to-completion worker (runtime/serve/serving.py Scheduler)."""
    yield from serve(artifacts, media, "--batching", "static")


@contextlib.contextmanager
def serving(srv):
    """Run the server on a daemon thread, quietly; shut it down and close it after."""
    srv.quiet = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def post(server, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url(server, "/v1/chat/completions"), data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(server, path: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url(server, path), timeout=30) as r:
        return r.status, json.loads(r.read())


def stream(server, body) -> list[str]:
    """The `data:` payloads of a streamed response, in order; checks the SSE framing."""
    data = json.dumps({**body, "stream": True}).encode()
    req = urllib.request.Request(url(server, "/v1/chat/completions"), data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == ""  # every event ends with a blank line
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    return [e[len("data: "):] for e in events[:-1]]


def wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_chat(img, prompt="Describe this image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                         {"type": "text", "text": prompt}]}]


def greedy(messages, **extra) -> dict:
    return {"model": NAME, "messages": messages, "max_tokens": N_NEW, "temperature": 0, "ignore_eos": True, **extra}


def hf_chat(hf, processor, messages, images=(), ignore_eos=True) -> tuple[int, list[int]]:  # noqa: F811
    """HF: the same OpenAI-format messages through the processor's chat template, then greedy `generate`
    (EOS disabled with `ignore_eos`, else the checkpoint's) -> (prompt tokens, new tokens)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {"images": [Image.open(p).convert("RGB") for p in images]} if images else {}
    inputs = processor(text=[text], return_tensors="pt", **kwargs)
    return inputs["input_ids"].shape[1], hf_greedy(hf, inputs, N_NEW, stop_at_eos=not ignore_eos)


def hf_text(processor, tokens) -> str:  # noqa: F811
    return processor.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="module")
def alone(server, media):  # noqa: F811
    """Whole responses of the two reference requests, each sent alone."""
    img = media["images"][0]
    return {"image": post(server, greedy(image_chat(img))), "text": post(server, greedy(
        [{"role": "user", "content": "Write a haiku about the sea."}]))}


def test_models_and_health(server):
    assert get(server, "/health") == (200, {"status": "ok"})
    status, models = get(server, "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [NAME] and models["object"] == "list"


def test_image_data_url_matches_hf(alone, media, hf_qwen3_vl, processor):  # noqa: F811
    img = media["images"][0]
    status, r = alone["image"]
    n_prompt, tokens = hf_chat(hf_qwen3_vl, processor, image_chat(img), [img])
    assert status == 200 and r["object"] == "chat.completion" and r["model"] == NAME
    choice = r["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": hf_text(processor, tokens)}
    assert choice["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": N_NEW, "total_tokens": n_prompt + N_NEW}


def test_file_url_image_and_video_match_hf(server, alone, media, hf_qwen3_vl, processor):  # noqa: F811
    """A file:// image gives what its data URL gives; a file:// frame directory gives HF's tokens for the video."""
    from test_generate import hf_generate

    img = media["images"][0]
    status, r = post(server, greedy([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": img.as_uri()}}, {"type": "text", "text": "Describe this image."}]}]))
    assert status == 200 and r["choices"] == alone["image"][1]["choices"]
    status, r = post(server, greedy([{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": media["frames_dir"].as_uri()}},
        {"type": "text", "text": "What happens?"}]}]))
    tokens = hf_generate(hf_qwen3_vl, processor, "What happens?", frames=media["frames"])
    assert status == 200 and r["choices"][0]["message"]["content"] == hf_text(processor, tokens)


def test_text_only_with_eos_matches_hf(server, hf_qwen3_vl, processor):  # noqa: F811
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    status, r = post(server, {"messages": messages, "max_completion_tokens": N_NEW, "temperature": 0.0})
    n_prompt, tokens = hf_chat(hf_qwen3_vl, processor, messages, ignore_eos=False)
    assert status == 200
    assert r["choices"][0]["message"]["content"] == hf_text(processor, tokens)
    stopped = tokens[-1] in hf_qwen3_vl.generation_config.eos_token_id
    assert r["choices"][0]["finish_reason"] == ("stop" if stopped else "length")
    assert r["usage"]["completion_tokens"] == len(tokens) and r["usage"]["prompt_tokens"] == n_prompt


def test_stream_equals_whole(server, alone, media):  # noqa: F811
    payloads = stream(server, greedy(image_chat(media["images"][0]), stream_options={"include_usage": True}))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    assert all(set(d) == {"content"} and d["content"] for d in content)
    whole = alone["image"][1]
    assert "".join(d["content"] for d in content) == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_stop_string_cuts_the_text(server, alone):
    text = alone["text"][1]["choices"][0]["message"]["content"]
    stop = text[12:15]
    assert len(stop) == 3
    body = greedy([{"role": "user", "content": "Write a haiku about the sea."}], stop=["\u2603never", stop])
    status, r = post(server, body)
    assert status == 200 and r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["message"]["content"] == text[:text.index(stop)]
    assert r["usage"]["completion_tokens"] < N_NEW
    streamed = [json.loads(p) for p in stream(server, body)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == text[:text.index(stop)]
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_are_batched_and_match_each_alone(static_server, alone, media, monkeypatch):  # noqa: F811
    """`--batching static`: two requests waiting while the model is busy run as one batch of `generate`, each with
    its text alone.
    The worker is held (deterministically) on a first request until both others have been queued."""
    sizes, gate, run = [], threading.Event(), static_server.scheduler.run

    def held_run(batch):
        sizes.append(len(batch))
        gate.wait(timeout=60)
        run(batch)

    monkeypatch.setattr(static_server.scheduler, "run", held_run)
    bodies = {"first": greedy([{"role": "user", "content": "hi"}], max_tokens=2),
              "image": greedy(image_chat(media["images"][0])),
              "text": greedy([{"role": "user", "content": "Write a haiku about the sea."}])}
    out = {}

    def send(k):
        out[k] = post(static_server, bodies[k])

    threads = [threading.Thread(target=send, args=("first",))]
    threads[0].start()
    wait_until(lambda: sizes)  # the worker holds the first request
    threads += [threading.Thread(target=send, args=(k,)) for k in ("image", "text")]
    for t in threads[1:]:
        t.start()
    wait_until(lambda: static_server.scheduler.pending.qsize() == 2)
    gate.set()
    for t in threads:
        t.join(timeout=120)
    assert sizes == [1, 2]
    for k in ("image", "text"):
        assert out[k][0] == 200
        assert out[k][1]["choices"] == alone[k][1]["choices"] and out[k][1]["usage"] == alone[k][1]["usage"]


def test_worker_batches_matching_requests(static_server, alone, media):  # noqa: F811
    """`--batching static`: two greedy jobs share one `generate` call and each gets the text it gets alone; a
    seeded sampled job is never batched with another."""
    from qwen_vl_trt.runtime.serve.openai_protocol import parse_chat_request
    from qwen_vl_trt.runtime.serve.serving import Job

    def job(body):
        request = parse_chat_request(body).request
        return Job(static_server.pre.prepare(request), request.max_new_tokens, request)

    jobs = [job(greedy(image_chat(media["images"][0]))),
            job(greedy([{"role": "user", "content": "Write a haiku about the sea."}]))]
    seeded = [job({"messages": [{"role": "user", "content": "hi"}], "seed": 3, "temperature": 0.7,
                   "max_tokens": 4}) for _ in range(2)]
    assert static_server.scheduler.batches(jobs + seeded) == [jobs, seeded[:1], seeded[1:]]
    static_server.scheduler.run(jobs)  # the worker thread is idle: no request is in flight
    for j, key in zip(jobs, ("image", "text")):
        events = []
        while not events or events[-1][0] == "delta":
            events.append(j.events.get(timeout=1))
        assert "".join(e[1] for e in events[:-1]) == alone[key][1]["choices"][0]["message"]["content"]
        assert events[-1][:3] == ("done", "length", N_NEW)  # (then the choice index and logprobs)


def test_a_short_request_behind_a_long_one_ends_first(server, alone, media):  # noqa: F811
    """In-flight batching (the default worker): while a 900-token stream runs, a short request and an image request
    join the batch, end first, and each gets the text it gets alone; the long stream ends whole afterwards."""
    long_body = {"messages": [{"role": "user", "content": "Write a haiku about the sea."}], "max_tokens": 900,
                 "temperature": 0, "ignore_eos": True}
    long_out, first_delta = [], threading.Event()

    def send_long():
        req = urllib.request.Request(url(server, "/v1/chat/completions"),
                                     data=json.dumps({**long_body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            for line in r:
                if line.startswith(b"data: {") and b'"content": "' in line:
                    first_delta.set()
                long_out.append(line)

    thread = threading.Thread(target=send_long)
    thread.start()
    assert first_delta.wait(timeout=120)  # the long request is decoding
    short = post(server, greedy([{"role": "user", "content": "Write a haiku about the sea."}]))
    image = post(server, greedy(image_chat(media["images"][0])))
    assert not any(b"[DONE]" in line for line in long_out)  # both ended while the long one still runs
    assert short[1]["choices"] == alone["text"][1]["choices"] and image[1]["choices"] == alone["image"][1]["choices"]
    thread.join(timeout=300)
    final = [json.loads(line[len(b"data: "):]) for line in long_out if line.startswith(b"data: {")]
    assert final[-1]["choices"][0]["finish_reason"] == "length" and long_out[-2].strip() == b"data: [DONE]"


def test_system_and_multi_turn_match_hf(server, media, hf_qwen3_vl, processor):  # noqa: F811
    from qwen_vl_trt.runtime.serve.openai_protocol import parse_messages
    from qwen_vl_trt.runtime.prompt import build_messages

    img = media["images"][1]
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                             {"type": "image_url", "image_url": {"url": data_url(img)}},
                                             {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Noise, mostly."}]},
                {"role": "user", "content": "And which colour dominates?"}]
    conversation, images, _ = parse_messages(messages)
    ours = server.pre.tokenizer.render(build_messages(conversation, n_images=len(images)))
    assert ours == processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.count("<|im_start|>") == 5
    status, r = post(server, greedy(messages))
    n_prompt, tokens = hf_chat(hf_qwen3_vl, processor, messages, [img])
    assert status == 200 and r["usage"]["prompt_tokens"] == n_prompt
    assert r["choices"][0]["message"]["content"] == hf_text(processor, tokens)


PIXEL = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "the request body is not valid JSON: Expecting property name enclosed in double quotes: "
                        "line 1 column 2 (char 1)"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                          "@@@"}}]}]},
     400, "messages[0].content[0].image_url: invalid base64 data (Only base64 data is allowed)"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PIXEL}}]}]},
     400, "cannot read image <image 0>: not a supported image format; convert it to PNG or JPEG"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]},
     400, "messages[0].content[0].image_url: https URLs are not fetched by this server; send the image as a "
          "data:image/...;base64 URL or a file:// path on the server"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file:///v.mp4"}},
                                                {"type": "image_url", "image_url": {"url": PIXEL}}]}]},
     400, "messages: at most one video per request, after all images"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n: must be in [1, 16], got 17"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens: must be an integer, "
                                                                                 "got str"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400,
     "prompt has {n_long} tokens, artifacts allow at most 512: re-export with a larger --max-seq"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000}, 400,
     "prompt has 9 tokens and max_tokens is 2000: together they exceed the 1024-token cache of the artifacts; "
     "lower max_tokens or re-export with a larger --max-cache-len"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404,
     f"model 'gpt-4o' is not served here; GET /v1/models lists '{NAME}'"),
])
def test_bad_requests_get_error_objects(server, processor, body, status, message):  # noqa: F811
    long = [{"role": "user", "content": "word " * 600}]
    n_long = len(processor.tokenizer(processor.apply_chat_template(long, tokenize=False, add_generation_prompt=True))
                 ["input_ids"])
    message = message.replace("{n_long}", str(n_long))
    code, r = post(server, body, raw=body if isinstance(body, bytes) else None)
    assert code == status
    assert set(r["error"]) == {"message", "type", "param", "code"} and r["error"]["type"] == "invalid_request_error"
    assert r["error"]["message"] == message
    assert get(server, "/health") == (200, {"status": "ok"})


def test_client_hanging_up_mid_stream(server, alone, monkeypatch):
    """The worker stops generating for a client that has gone, and the server answers the next request."""
    from qwen_vl_trt.runtime.serve import serving

    generated, push = [], serving.Job.push
    monkeypatch.setattr(serving.Job, "push", lambda job, token: push(job, token) or generated.append(job.max_new))
    body = json.dumps({"messages": [{"role": "user", "content": "Write a haiku about the sea."}], "max_tokens": 900,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    status, r = post(server, greedy([{"role": "user", "content": "Write a haiku about the sea."}]))
    assert status == 200 and r["choices"] == alone["text"][1]["choices"]
    assert 0 < generated.count(900) < 450 and generated.count(N_NEW) == N_NEW


def run_server(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.serve.server", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_startup_errors_are_one_line_exit_2(artifacts, tmp_path):  # noqa: F811
    r = run_server("--model-dir", tmp_path / "none")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: artifacts directory not found: {tmp_path / 'none'}; run export_all.sh CHECKPOINT "
        f"{tmp_path / 'none'} first"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_server("--model-dir", artifacts, "--port", port)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pick another --port"]
    r = run_server("--model-dir", artifacts, "--max-batch", 3)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: --max-batch 3: must be in [1, 2] (the artifacts' max batch); re-export with a larger --max-batch"]


def test_cache_flags(server, artifacts, media):  # noqa: F811
    """The in-flight engine reuses by default (both caches, with decoder.ort.onnx as with decoder.onnx);
    --no-prefix-cache / --encoder-cache-mb 0 turn each cache off; a
    negative size is one error line, exit 2. The worker's cache_stats() is the counters the metrics read."""
    from qwen_vl_trt.runtime.scheduler import DEFAULT_ENCODER_CACHE_MB, DEFAULT_PREFIX_CACHE_MB
    from qwen_vl_trt.runtime.serve.server import make_server, parser

    engine = server.scheduler.engine  # decoder.ort.onnx (the default graphs): its prompts continue in chunks
    assert engine.continuation == "chunks" and engine.prefix_cache.budget == DEFAULT_PREFIX_CACHE_MB << 20
    assert engine.encoder_cache.budget == DEFAULT_ENCODER_CACHE_MB << 20
    plugin = make_server(parser().parse_args(["--model-dir", str(artifacts), "--port", "0", "--backend", "onnxruntime",
                                              "--ort-graphs", "plugin"]))
    try:
        assert plugin.scheduler.engine.prefix_cache.budget == DEFAULT_PREFIX_CACHE_MB << 20
    finally:
        plugin.server_close()
    stats = server.scheduler.cache_stats()
    assert set(stats) >= {"prefix_cache_queries", "prefix_cache_hits", "encoder_cache_hits", "encoder_cache_misses"}
    body = server.metrics.exposition()[0].decode().splitlines()  # /metrics reads the same counters at scrape
    for name in ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_evictions", "encoder_cache_hits",
                 "encoder_cache_misses", "encoder_cache_evictions", "prefix_cache_bytes", "encoder_cache_bytes"):
        suffix = "" if name.endswith("_bytes") else "_total"  # the bytes held are gauges
        (line,) = [ln for ln in body if ln.startswith(f"vllm:{name}{suffix}{{")]
        assert float(line.split()[-1]) == server.scheduler.cache_stats()[name]
    off = make_server(parser().parse_args(["--model-dir", str(artifacts), "--port", "0", "--backend", "onnxruntime",
                                           "--no-prefix-cache", "--encoder-cache-mb", "0"]))
    try:
        assert off.scheduler.engine.prefix_cache is None and off.scheduler.engine.encoder_cache is None
    finally:
        off.server_close()
    r = run_server("--model-dir", artifacts, "--prefix-cache-mb", "-1")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: --prefix-cache-mb -1.0: must be >= 0 (0 turns the cache off)"]


def test_make_server_prestarts_the_image_decode_worker(artifacts, media, monkeypatch):  # noqa: F811
    """make_server starts the process's image-decode worker (runtime/media_guard.py) while the model loads: by the
    time it returns (or shortly after) one worker is idle, so a fresh server's first image does not wait for one."""
    from qwen_vl_trt.runtime import media_guard
    from qwen_vl_trt.runtime.serve.server import make_server, parser

    fresh = media_guard.DecodePool()  # not the process's pool, which other tests' servers have started
    monkeypatch.setattr(media_guard, "pool", lambda: fresh)
    srv = make_server(parser().parse_args(["--model-dir", str(artifacts), "--port", "0", "--backend", "onnxruntime"]))
    try:
        deadline = time.monotonic() + 30
        while not fresh._idle and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fresh._started == 1 and len(fresh._idle) == 1
    finally:
        srv.server_close()
        fresh.close()
