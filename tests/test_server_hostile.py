"""`qwen-vl-serve` under hostile input (issue 14): one test per row of the issue's table, through a real socket.

The server runs in this process on 127.0.0.1 (ephemeral port) over the tiny Qwen3-VL artifacts of
test_generate.py, with small limits so that each case is quick: read timeout 2 s, 4 concurrent requests, 2 MiB
bodies, 4 images per request, file:// media only inside `allowed/`. Each hostile request must get its 4xx within
a stated time (and, for the image bombs, with the process's peak RSS growing far less than the decoded image
would take: PIL's RGB buffer alone is 3 bytes a pixel); after each, the server must still answer the reference
request (an image as a data URL, 32 greedy tokens) with the text `trt-run` prints for the same image and prompt
(`trt_text`; test_server.py checks that text against HF `generate`). Every loop is bounded.
"""
from __future__ import annotations

import base64
import json
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from media_bombs import BOMB_MESSAGE, png_bomb
from raw_http import http, peak_rss, port, post_bytes, read_response, reset_peak_rss
from test_generate import N_NEW, artifacts, media, run_json  # noqa: F401 (fixtures)
from test_server import serving

PROMPT = "Describe this image."
READ_TIMEOUT = 2.0
MALFORMED = ("malformed HTTP/1.1 request: a bad request line or header, headers over 16 KiB, or a Content-Length that "
             "is not one decimal number")
LOCAL_UNUSABLE = ("this local media cannot be used: it must be a readable image or video file (or frame "
                  "directory) inside the server's allowed media directory")


@pytest.fixture(scope="module")
def allowed(tmp_path_factory, media):  # noqa: F811
    """allowed/ (the served directory) and files outside it that a client may try to reach."""
    root = tmp_path_factory.mktemp("hostile")
    d = root / "allowed"
    d.mkdir()
    (d / "good.png").write_bytes(media["images"][0].read_bytes())
    (root / "outside.png").write_bytes(media["images"][0].read_bytes())
    (d / "link.png").symlink_to(root / "outside.png")
    (d / "empty.png").write_bytes(b"")
    (d / "sub").mkdir()
    (d / "secret.ppm").write_bytes(b"P6\nSECRET-HEADER-BYTES\n" + bytes(64))
    (d / "noframes").mkdir()
    (d / "noframes" / "notes.txt").write_text("no frames here")
    return d


@pytest.fixture(scope="module")
def server(artifacts, allowed):  # noqa: F811
    from qwen_vl_trt.runtime.serve.server import make_server, parser

    srv = make_server(parser().parse_args([
        "--model-dir", str(artifacts), "--port", "0", "--backend", "onnxruntime", "--allowed-local-media-path",
        str(allowed), "--read-timeout", str(READ_TIMEOUT), "--max-concurrent-requests", "4", "--max-body-mb", "2",
        "--max-images-per-request", "4"]))
    with serving(srv):
        yield srv


@pytest.fixture(scope="module")
def trt_text(artifacts, media):  # noqa: F811
    """What `trt-run --image IMG --prompt PROMPT` prints (greedy, N_NEW tokens, EOS ignored)."""
    return run_json(artifacts, "--image", str(media["images"][0]), "--prompt", PROMPT)["text"]


# ---- helpers ----------------------------------------------------------------------------------------------
def chat(server, body: dict, **kw) -> tuple[int, dict, float]:
    status, _, raw, seconds = http(server, json.dumps(body).encode(), **kw)
    return status, json.loads(raw), seconds


def image_body(url: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": PROMPT}]}],
            "max_tokens": N_NEW, "temperature": 0, "ignore_eos": True, **extra}


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def assert_serves(server, media, trt_text) -> None:  # noqa: F811
    """The server still answers the reference request with trt-run's text."""
    status, r, _ = chat(server, image_body(data_url(media["images"][0].read_bytes())))
    assert status == 200, r
    assert r["choices"][0]["message"]["content"] == trt_text


def error_message(r: dict) -> str:
    assert set(r["error"]) == {"message", "type", "param", "code"}, r
    return r["error"]["message"]


# ---- image bombs and image counts -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bombs() -> dict:
    return {(w, h): png_bomb(w, h) for w, h in ((9000, 9000), (13000, 13000))}


@pytest.mark.parametrize("size", [(9000, 9000), (13000, 13000)])
def test_png_bomb_is_refused_from_its_header(server, media, trt_text, bombs, size):  # noqa: F811
    """Was: decoded in full (peak 5.6 / 10 GB, 16-38 s), then 400. Now: refused in < 1 s from the PNG header,
    peak RSS growing < 64 MiB (the base64 body and its decoded bytes are < 2 MiB; decoding would take 243 MB
    / 507 MB for PIL's RGB buffer alone)."""
    width, height = size
    before = reset_peak_rss()
    status, r, seconds = chat(server, image_body(data_url(bombs[size])))
    growth = peak_rss() - before
    assert status == 400 and seconds < 1.0, (status, seconds)
    assert error_message(r) == BOMB_MESSAGE.format(name="<image 0>")
    assert growth < 64 << 20 and growth < 3 * width * height / 20, growth
    assert_serves(server, media, trt_text)


def test_png_bomb_refused_by_the_pipeline_for_trt_run_and_triton(server, allowed, bombs):
    """trt-run and Triton call the same `Preprocessor.prepare`: a bomb path or bomb bytes are refused there
    before decoding (< 1 s, peak RSS growth < 64 MiB)."""
    from qwen_vl_trt.model.errors import ImageError
    from qwen_vl_trt.runtime.request import Request

    path = allowed.parent / "bomb.png"
    path.write_bytes(bombs[(9000, 9000)])
    for source, name in ((str(path), str(path)), (bombs[(9000, 9000)], "<image 0>")):
        before, t0 = reset_peak_rss(), time.monotonic()
        with pytest.raises(ImageError) as e:
            server.pre.prepare(Request(PROMPT, (source,)))
        assert time.monotonic() - t0 < 1.0 and peak_rss() - before < 64 << 20
        assert str(e.value) == BOMB_MESSAGE.format(name=name)
    from PIL import Image
    assert Image.MAX_IMAGE_PIXELS == 67108864  # PIL's own check (video frames) uses the same number


def test_many_images_refused_before_decoding(server, media, trt_text):  # noqa: F811
    """Was: 1000 images decoded, 400 after 11-13 s and 2.3-4.1 GB. Now: the count limit (4 here) answers at
    once; within it, the token estimate from the headers refuses images that cannot fit max_seq (512)."""
    small = data_url(png_bomb(64, 64))  # 82 bytes: 1000 of them fit the 2 MiB body
    parts = [{"type": "image_url", "image_url": {"url": small}}] * 1000
    status, r, seconds = chat(server, {"messages": [{"role": "user", "content": parts}], "max_tokens": 1})
    assert status == 400 and seconds < 2.0
    assert error_message(r) == "messages: at most 4 images per request"
    big = data_url(png_bomb(1000, 1000))  # 1000x1000 -> 992x992 px -> 961 tokens each: over max_seq 512
    three_big = parts[:1] + [{"type": "image_url", "image_url": {"url": big}}] * 3
    status, r, seconds = chat(server, {"messages": [{"role": "user", "content": three_big}], "max_tokens": 1})
    assert status == 400 and seconds < 1.0
    assert error_message(r).startswith("the images need at least ")
    assert error_message(r).endswith(" prompt tokens, artifacts allow at most 512: send fewer or smaller images "
                                     "or re-export with a larger --max-seq")
    assert_serves(server, media, trt_text)


# ---- local media -----------------------------------------------------------------------------------------
def local_cases(allowed: Path) -> list[tuple[str, str]]:
    """(content part type, URL) that must all get the same 400."""
    outside = allowed.parent / "outside.png"
    return [("image_url", "file:///etc/passwd"), ("image_url", f"file://{allowed}/../outside.png"),
            ("image_url", (allowed / "link.png").as_uri()), ("image_url", f"file://otherhost{allowed}/good.png"),
            ("image_url", (allowed / "missing.png").as_uri()), ("image_url", (allowed / "sub").as_uri()),
            ("image_url", (allowed / "empty.png").as_uri()), ("image_url", (allowed / "secret.ppm").as_uri()),
            ("image_url", outside.as_uri()), ("video_url", (allowed / "noframes").as_uri()),
            ("video_url", "file:///etc/passwd"), ("video_url", (allowed / "missing").as_uri())]


def test_local_media_only_inside_the_allowed_directory(server, allowed, media, trt_text):  # noqa: F811
    """Was: any readable file opened, the host part ignored, messages saying which file exists and echoing
    header bytes. Now: one message for every unusable URL; a file inside the directory works."""
    for kind, url in local_cases(allowed):
        part = {"type": kind, kind: {"url": url}}
        status, _, raw, _ = http(server, json.dumps({"messages": [{"role": "user", "content": [part]}],
                                                     "max_tokens": 1}).encode())
        assert status == 400, (url, raw)
        assert error_message(json.loads(raw)) == LOCAL_UNUSABLE, url
        assert b"SECRET" not in raw and b"root:" not in raw
    status, r, _ = chat(server, image_body((allowed / "good.png").as_uri()))
    assert status == 200 and r["choices"][0]["message"]["content"] == trt_text


def test_local_media_refused_without_an_allowed_directory():
    from qwen_vl_trt.runtime.serve.openai_protocol import ProtocolError, parse_chat_request

    with pytest.raises(ProtocolError) as e:
        parse_chat_request(image_body("file:///etc/hostname"))
    assert str(e.value) == ("local media (file://) is not allowed by this server; send images as "
                            "data:image/...;base64 URLs (the operator can allow a directory with "
                            "--allowed-local-media-path)")


# ---- request framing and fields --------------------------------------------------------------------------
TEXT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
DEEP = b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"


def text_body(**fields) -> bytes:
    return json.dumps({**TEXT, **fields}).encode()


@pytest.mark.parametrize("body,headers,status,message", [
    (text_body(), {"Content-Length": "\u00b2"}, 400, MALFORMED),  # h11 refuses it before the app sees it
    (text_body(), {"Content-Length": None, "Transfer-Encoding": "chunked"}, 400,
     "send the request body with a Content-Length header (a decimal number of bytes)"),
    (DEEP, {}, 400, "the request body is not valid JSON: nested too deeply"),
    (b'{"messages": [], "seed": ' + b"7" * 5000 + b"}", {}, 400,
     "the request body is not valid JSON: Exceeds the limit (4300 digits) for integer string conversion: "
     "value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}', {}, 400,
     "messages[0].content: not valid Unicode text (a lone surrogate escape?)"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfffb"}]}]}', {}, 400,
     "messages[0].content[0].text: not valid Unicode text (a lone surrogate escape?)"),
    (text_body(seed=-1), {}, 400, "seed: must be in [0, 2**63), got -1"),
    (text_body(seed=1 << 70), {}, 400, "seed: integer out of range"),
    (text_body(temperature=float("inf")), {}, 400, "the request body is not valid JSON: Infinity is not a JSON number"),
    (b'{"messages": [], "temperature": NaN}', {}, 400, "the request body is not valid JSON: NaN is not a JSON number"),
    (text_body(temperature=10 ** 400), {}, 400, "temperature: must be a finite number"),
    (text_body(top_p=-1e-300), {}, 400, "top_p: must be in (0, 1], got -1e-300"),
    (text_body(), {"Content-Type": "text/plain"}, 415, "Content-Type must be application/json, got 'text/plain'"),
    (text_body(), {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "Content-Type must be application/json, got 'application/x-www-form-urlencoded'"),
    (text_body(), {"Content-Type": None}, 415, "Content-Type must be application/json, got ''"),
    (text_body(), {"Host": "evil.example:8000"}, 421,
     "Host 'evil.example:8000' is not this server's address (it listens on 127.0.0.1)"),
    (b"", {"Content-Length": str(250 << 20)}, 413, "request body of 262144000 bytes is over the 2 MiB limit"),
])
def test_bad_framing_and_fields_are_4xx(server, body, headers, status, message):
    """Was: 500 (ValueError, RecursionError, TypeError), NaN sampling, cross-site form posts accepted. Now: the
    stated 4xx within 2 s; the connection is closed when the body was not read."""
    got, head, raw, seconds = http(server, body, headers)
    assert (got, error_message(json.loads(raw))) == (status, message)
    assert seconds < 2.0


def test_other_methods_are_405(server):
    """A browser's CORS preflight (OPTIONS) and other methods: 405, no Access-Control-* header."""
    for method in ("OPTIONS", "PUT", "DELETE"):
        with socket.create_connection(("127.0.0.1", port(server)), timeout=10) as s:
            s.sendall(f"{method} /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      "Origin: https://evil.example\r\nContent-Length: 0\r\n\r\n".encode())
            status, headers, raw = read_response(s)
        assert status == 405 and not any(k.startswith("access-control") for k in headers)
        assert error_message(json.loads(raw)) == f"method {method} is not allowed; use GET or POST"


def test_tiny_temperature_is_greedy(server, media, trt_text):  # noqa: F811
    """Was: temperature 1e-300 -> NaN probabilities, token 0 repeated. Now: below 1e-5 is greedy."""
    status, r, _ = chat(server, image_body(data_url(media["images"][0].read_bytes()), temperature=1e-300))
    assert status == 200 and r["choices"][0]["message"]["content"] == trt_text


def test_four_huge_bodies_at_once_are_refused_unread(server, media, trt_text):  # noqa: F811
    """Was: four 250 MB bodies read at once, 2.86 GB peak. Now: 413 from Content-Length, nothing read."""
    out, before = [], reset_peak_rss()

    def send():
        out.append(http(server, b"x" * 4096, {"Content-Length": str(250 << 20)}, timeout=10))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(o[0] for o in out) == [413] * 4 and max(o[3] for o in out) < 2.0
    assert all(o[1].get("connection") == "close" for o in out)
    assert peak_rss() - before < 64 << 20
    assert_serves(server, media, trt_text)


# ---- connections -----------------------------------------------------------------------------------------
def test_64_concurrent_connections_see_no_reset(server):
    """Was: 2-13 ECONNRESET per 90 s run of 32 clients (listen backlog 5, HTTP/1.0). Now: 64 clients connect at
    once (each connect completes in < 1 s: none waits out a dropped SYN), each sends a health check, a one-token
    chat and another health check on its one keep-alive connection, and all 192 answers arrive (the chats queue for the 4 request slots, longer than the 2 s read
    timeout: waiting for a slot is not a slow client)."""
    barrier, results, errors, connect_s = threading.Barrier(64), [], [], []

    def client():
        try:
            barrier.wait(timeout=30)
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", port(server)), timeout=60) as s:
                connect_s.append(time.monotonic() - t0)
                for req in (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", post_bytes(text_body()),
                            b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"):
                    s.sendall(req)
                    results.append(read_response(s)[0])
        except Exception as e:  # noqa: BLE001 - any failure is what this test counts
            errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and sorted(results) == [200] * 192
    assert max(connect_s) < 1.0  # a full listen backlog drops SYNs: Linux retries after 1 s, then 3 s, ...


def test_slow_clients_are_cut_at_the_read_timeout(server, media, trt_text):  # noqa: F811
    """Was: 50 connections sending 1 byte/s held open forever, a thread each. Now: 8 slow senders of headers
    and 3 slow senders of bodies (3 of the 4 request slots) are closed within the 2 s read timeout (+1 s), and
    the reference request is answered meanwhile."""
    request = post_bytes(text_body())
    body_at = request.index(b"\r\n\r\n") + 4
    closed_after = []

    def slow(start: int):
        """Send the request a byte every 0.2 s from `start` on; record when the server closes the connection."""
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port(server)), timeout=10) as s:
            s.sendall(request[:start])
            try:
                for i in range(start, len(request)):
                    s.sendall(request[i:i + 1])
                    if select.select([s], [], [], 0.2)[0] and not s.recv(65536):
                        break  # end of stream: the server hung up
            except OSError:  # a reset or broken pipe is a hang-up too
                pass
        closed_after.append(time.monotonic() - t0)

    threads = [threading.Thread(target=slow, args=(4,)) for _ in range(8)]
    threads += [threading.Thread(target=slow, args=(body_at,)) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert_serves(server, media, trt_text)
    for t in threads:
        t.join(timeout=30)
    assert len(closed_after) == 11 and max(closed_after) < READ_TIMEOUT + 1.0, closed_after


def test_non_streaming_client_hanging_up_cancels_its_generation(server, media, trt_text, monkeypatch):  # noqa: F811
    """Was: generation went on after the client left; the next request waited 25-29 s. Now: the handler sees
    the closed connection while it waits and cancels the job; the worker stops at its next step."""
    from qwen_vl_trt.runtime.serve import serving

    pushed, push = [], serving.Job.push
    monkeypatch.setattr(serving.Job, "push", lambda job, token: push(job, token) or pushed.append(job.max_new))
    body = text_body(max_tokens=900, temperature=0, ignore_eos=True)
    with socket.create_connection(("127.0.0.1", port(server)), timeout=10) as s:
        s.sendall(post_bytes(body))
        deadline = time.monotonic() + 60
        while not pushed and time.monotonic() < deadline:  # generation has started
            time.sleep(0.01)
    assert pushed
    time.sleep(1.0)  # the handler polls every 0.1 s; the worker checks at every token
    stopped_at = pushed.count(900)
    time.sleep(0.5)
    assert pushed.count(900) == stopped_at < 450
    assert_serves(server, media, trt_text)


# ---- issue 21: framing on uvicorn/h11, NUL bytes, log lines, penalties ---------------------------------------
def read_all(s: socket.socket, seconds: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (bounded by `seconds`)."""
    data, deadline = b"", time.monotonic() + seconds
    s.settimeout(seconds)
    while time.monotonic() < deadline:
        try:
            more = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not more:
            break
        data += more
    return data


def test_conflicting_content_lengths_are_400_and_nothing_is_smuggled(server):
    """Was: two Content-Length headers accepted, the rest of the body served as a second request (smuggling
    behind a proxy). Now (RFC 9112 section 6.3): 400 with the error object, the connection closed, one response
    only: the smuggled `GET /health` is never answered."""
    smuggled = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    body = text_body()
    for lengths in ((len(body), len(body) + len(smuggled)), (len(body) + len(smuggled), len(body))):
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + b"".join(b"Content-Length: %d\r\n" % n for n in lengths) + b"\r\n")
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port(server)), timeout=10) as s:
            s.sendall(head + body + smuggled)
            raw = read_all(s)
        assert time.monotonic() - t0 < 2.0
        assert raw.startswith(b"HTTP/1.1 400 ") and raw.count(b"HTTP/1.1 400 ") == 1, raw[:200]
        assert b"HTTP/1.1 200" not in raw and b'"status": "ok"' not in raw
        head_text, _, payload = raw.partition(b"\r\n\r\n")
        assert b"connection: close" in head_text.lower()
        assert error_message(json.loads(payload)) == MALFORMED


def test_equal_duplicate_content_lengths_are_one_request(server):
    """Two equal Content-Length headers: RFC 9112 section 6.3 lets a server take them as one (h11 does); the
    request is answered once and the connection stays usable."""
    body = text_body()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(body), len(body)) + body)
    with socket.create_connection(("127.0.0.1", port(server)), timeout=30) as s:
        s.sendall(req)
        status, _, raw = read_response(s)
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 1
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(s)[0] == 200


def test_half_closed_client_gets_its_response(server, media, trt_text):  # noqa: F811
    """Was: a client that shut down its write side after its request got no response. Now it gets the whole
    answer (after an interim 100 Continue, which tells a half-close from a hang-up), with trt-run's text, and
    the server closes the connection after it."""
    body = json.dumps(image_body(data_url(media["images"][0].read_bytes()))).encode()
    with socket.create_connection(("127.0.0.1", port(server)), timeout=60) as s:
        s.sendall(post_bytes(body))
        s.shutdown(socket.SHUT_WR)
        status, _, raw = read_response(s)
        assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == trt_text
        assert s.recv(1) == b""  # and then the server closes


@pytest.mark.parametrize("url", ["file:///etc/passwd%00.png", "file:///etc/passwd\x00.png", "{allowed}/good.png%00",
                                 "{allowed}/good\x00.png"])
def test_nul_byte_in_file_url_is_400(server, allowed, media, trt_text, url):  # noqa: F811
    """Was: a NUL byte in a file:// URL -> 500 with a traceback (os.path.realpath's ValueError), 11 of 11 times.
    Now: the one local-media 400, 5 times in a row, each within 2 s, and the server still serves."""
    url = url.replace("{allowed}", allowed.as_uri())
    for _ in range(5):
        status, r, seconds = chat(server, image_body(url))
        assert (status, error_message(r)) == (400, LOCAL_UNUSABLE) and seconds < 2.0
    assert_serves(server, media, trt_text)


def test_log_lines_cannot_be_forged_or_flooded(server, allowed, caplog):
    """Was: a `%0A` in a file:// path wrote a forged line into the log, a 100 KB path a 100 KB line. Now every
    record the server logs for such requests (local-media refusals, the access log) is one line of at most
    ~1 KB: control characters escaped, long paths cut with their length said."""
    import logging

    forged = "\nERROR forged line"
    cases = [image_body(allowed.as_uri() + "/x%0AERROR%20forged%20line.png"),
             image_body(allowed.as_uri() + "/" + "a" * 100_000 + ".png"),
             image_body(allowed.as_uri() + "/x\nERROR forged line.png")]
    server.quiet = False  # the access log too
    try:
        with caplog.at_level(logging.INFO, logger="qwen_vl_trt.server"):
            for body in cases:
                status, r, _ = chat(server, body)
                assert (status, error_message(r)) == (400, LOCAL_UNUSABLE)
            for path in ("/x%0AERROR%20forged%20line", "/" + "b" * 10_000):  # a 100 KB path is h11's 400 (16 KiB)
                with socket.create_connection(("127.0.0.1", port(server)), timeout=10) as s:
                    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                    assert read_response(s)[0] == 404
    finally:
        server.quiet = True
    records = [r for r in caplog.records if r.name.startswith("qwen_vl_trt.server")]
    assert len(records) >= len(cases) + 2
    for record in records:
        line = record.getMessage()
        assert "\n" not in line and "\r" not in line and forged not in line and len(line) < 1200, line[:300]
    assert any("(100" in r.getMessage() and "characters)" in r.getMessage() for r in records)
    assert any("ERROR forged line" in r.getMessage() for r in records)  # escaped, on the same line
    status, _, raw, _ = http(server, b"", {"Content-Length": "0"})
    assert status == 400  # still serving


@pytest.mark.parametrize("penalty,status", [(1e-44, 400), (1e-300, 400), (0.0099, 400), (1e300, 400), (0.01, 200),
                                            (100.0, 200)])
def test_repetition_penalty_has_a_floor(server, penalty, status):
    """Was: repetition_penalty 1e-44 ... 1e-300 accepted, token 0 every time (logits / 1e-44 overflow float32).
    Now: [0.01, 100] (runtime/request.py), else a 400 naming the field."""
    got, r, _ = chat(server, {**TEXT, "repetition_penalty": penalty})
    assert got == status, r
    if status == 400:
        assert error_message(r) == f"repetition_penalty: must be in [0.01, 100] (1 = off), got {penalty}"


# ---- fuzz -------------------------------------------------------------------------------------------------
def fuzz_strategies():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | \
        st.text(max_size=12)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=6), inner, max_size=3), max_leaves=8)
    urls = st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,@@", "file:///etc/passwd",
                            "https://x.org/a.png", "file://h/x", "", "data:,"]) | st.text(max_size=20)
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "video_url", "video"]) | values},
                                 optional={"text": values, "image_url": st.fixed_dictionaries({"url": urls}) | values,
                                           "video_url": st.fixed_dictionaries({"url": urls}) | values})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | values},
                                    optional={"content": st.text(max_size=20) | st.lists(part, max_size=3) | values})
    fields = {k: values for k in ("temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop", "n",
                                  "stream", "stream_options", "ignore_eos", "model", "logprobs", "tools",
                                  "top_logprobs", "min_p", "min_tokens", "stop_token_ids", "response_format",
                                  "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                                  "include_stop_str_in_output", "skip_special_tokens")}
    chats = st.fixed_dictionaries({"messages": st.lists(message, max_size=3) | values}, optional=fields).map(
        lambda body: {**body, "max_tokens": 1})  # a valid request costs one decode step
    return values, chats


def test_fuzz_parser_refuses_or_accepts_never_crashes():
    """Any JSON value or chat-shaped object: a ChatRequest or a ProtocolError, nothing else (300 examples)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from qwen_vl_trt.runtime.serve.openai_protocol import ChatRequest, ProtocolError, parse_chat_request

    values, chats = fuzz_strategies()

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(values | chats)
    def check(body):
        try:
            assert isinstance(parse_chat_request(body), ChatRequest)
        except ProtocolError as e:
            assert 400 <= e.status < 500

    check()


def test_fuzz_http_any_bytes_get_4xx_or_200(server):
    """Any body bytes (random, or a chat-shaped JSON object), any Content-Type and a valid or broken
    Content-Length through the socket: a 200 or a 4xx within 10 s, never a 5xx or a hang (120 examples)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _, chats = fuzz_strategies()
    bodies = st.binary(max_size=200) | chats.map(lambda c: json.dumps(c).encode())
    kinds = st.sampled_from(["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain",
                             ""])
    lengths = st.sampled_from([None, None, None, "\u00b2", "-1", "1e3", "", "0x10", "9" * 20])

    @settings(max_examples=120, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(bodies, kinds, lengths)
    def check(body, kind, length):
        headers = {"Content-Type": kind or None}
        if length is not None:
            headers["Content-Length"] = length
        status, _, raw, seconds = http(server, body, headers, timeout=10)
        assert status == 200 or 400 <= status < 500, (status, raw[:300])
        assert seconds < 10

    check()


# ---- parser floods (issue 21 item 2): images whose headers pass but whose parse is slow or heavy -------------
# A server with the default limits (64 MiB bodies: the 44 MB APP1 flood is a 58.7 MB body as base64). Each flood
# is answered within 2 s of the request's last byte, with at most 256 MiB peak RSS growth of the server process
# and its decode workers (tests/process_tree.py; this process is the server). The machine is a loaded 2-core box:
# the answers came in 0.1-1.3 s here; the bars are the issue's.
FLOOD_MESSAGES = {
    "jpeg_app1_12MB": "image <image 0> is a JPEG with more than 1000 marker segments before its image data "
                      "(encoders write under 30); re-encode it",
    "jpeg_app1_44MB": "image <image 0> is a JPEG with more than 1000 marker segments before its image data "
                      "(encoders write under 30); re-encode it",
    "jpeg_scans": "image <image 0> is a JPEG with more than 256 scans (encoders write about 10); re-encode it",
    "png_chunks": "image <image 0> is a PNG with more than 3186 chunks (at most 256 + one per 4096 bytes of file); "
                  "re-encode it",  # 256 + 12,010,xxx // 4096
    "gif_comments": "image <image 0> did not decode within its limit (0.5 s of CPU time, 1.0 s in all, for reading "
                    "its header); re-encode it as a plain PNG or JPEG",
    "bmp_rle": "image <image 0> did not decode within its limit (0.5 s of CPU time, 1.0 s in all, for 64x64 pixels); "
               "re-encode it as a plain PNG or JPEG",
}


def flood(name: str) -> bytes:
    import media_bombs as B

    return {"jpeg_app1_12MB": lambda: B.jpeg_app1_flood(3_000_000),
            "jpeg_app1_44MB": lambda: B.jpeg_app1_flood(11_000_000), "jpeg_scans": lambda: B.jpeg_scan_flood(60_000), "png_chunks": lambda: B.png_chunk_flood(1_000_000),
            "gif_comments": lambda: B.gif_comment_flood(3_000_000),
            "bmp_rle": lambda: B.bmp_rle_flood(4_000_000)}[name]()


@pytest.fixture(scope="module")
def media_server(artifacts):  # noqa: F811
    from qwen_vl_trt.runtime.serve.server import make_server, parser

    srv = make_server(parser().parse_args(["--model-dir", str(artifacts), "--port", "0", "--backend", "onnxruntime"]))
    with serving(srv):
        yield srv


def seconds_after_last_byte(server, body: bytes) -> tuple[int, bytes, float]:
    """POST `body`; (status, response body, seconds from the request's last byte sent to the whole answer)."""
    with socket.create_connection(("127.0.0.1", port(server)), timeout=60) as s:
        s.sendall(post_bytes(body))
        t0 = time.monotonic()
        status, _, raw = read_response(s)
        return status, raw, time.monotonic() - t0


@pytest.mark.parametrize("name", FLOOD_MESSAGES)
def test_parser_floods_are_refused_within_2_s_and_256_MiB(media_server, media, trt_text, name):  # noqa: F811
    """Was (issue 21): 13.5 s / +430 MiB (APP1 12 MB), 33 s / +1.5 GiB kept (APP1 58.7 MB), 39.5 s (scans),
    6.5 s (PNG chunks), all 200. Now: 400 with what is wrong, from the structure prechecks or the decode budget."""
    from process_tree import TreePeak

    data = flood(name)
    body = json.dumps(image_body("data:image/jpeg;base64," + base64.b64encode(data).decode())).encode()
    del data
    assert len(body) < 64 << 20
    with TreePeak() as peak:
        status, raw, seconds = seconds_after_last_byte(media_server, body)
    assert status == 400, raw[:300]
    assert error_message(json.loads(raw)) == FLOOD_MESSAGES[name]
    assert seconds < 2.0, seconds
    assert peak.growth < 256 << 20, peak.growth
    assert_serves(media_server, media, trt_text)
