"""`POST /v1/completions`, `GET /metrics` and the official `openai` client against `qwen-vl-serve` (issue 21).

The server runs in this process on 127.0.0.1 with the tiny Qwen3-VL artifacts of test_generate.py (max batch 2).
References: HF `generate` (greedy, EOS ignored) on HF's own tokenization of the same raw prompt (completions use no
chat template; an image is HF's processor expanding `<|vision_start|><|image_pad|><|vision_end|>` where it stands);
for chat, HF's `apply_chat_template` as in test_server.py. /metrics is read with prometheus_client's text parser
and checked against the requests this test sent (token counters = the `usage` fields returned, one latency
observation per finished request, one inter-token observation per token after the first).
"""
from __future__ import annotations

import json
import threading
import urllib.request

import pytest
from PIL import Image

from test_generate import N_NEW, artifacts, media, processor  # noqa: F401 (fixtures)
from test_server import NAME, data_url, greedy, hf_chat, hf_text, image_chat, post, serve, url, wait_until

from qwen_vl_trt.runtime.serve.parity import hf_greedy

TEXT_PROMPT = "The sea at night is"
IMAGE_PARTS = ("Picture: ", " In one word, the main colour is")


@pytest.fixture(scope="module")
def server(artifacts, media):  # noqa: F811
    yield from serve(artifacts, media)


def post_to(server, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url(server, path), data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream_from(server, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed response; checks the SSE framing and the final `[DONE]`."""
    req = urllib.request.Request(url(server, path), data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        events = r.read().decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    return [json.loads(e[len("data: "):]) for e in events[:-2]]


def completion_body(prompt, **extra) -> dict:
    return {"model": NAME, "prompt": prompt, "max_tokens": N_NEW, "temperature": 0, "ignore_eos": True, **extra}


def image_prompt(img) -> list[dict]:
    return [{"type": "text", "text": IMAGE_PARTS[0]}, {"type": "image_url", "image_url": {"url": data_url(img)}},
            {"type": "text", "text": IMAGE_PARTS[1]}]


@pytest.fixture(scope="module")
def hf_completions(hf_qwen3_vl, processor, media):  # noqa: F811
    """HF greedy text and prompt length for the text prompt and the image prompt, without a chat template."""
    text_in = processor.tokenizer([TEXT_PROMPT], return_tensors="pt")
    img = media["images"][0]
    image_in = processor(text=[IMAGE_PARTS[0] + "<|vision_start|><|image_pad|><|vision_end|>" + IMAGE_PARTS[1]],
                         images=[Image.open(img).convert("RGB")], return_tensors="pt")
    out = {}
    for key, inputs in (("text", text_in), ("image", image_in)):
        tokens = hf_greedy(hf_qwen3_vl, dict(inputs), N_NEW)
        out[key] = (inputs["input_ids"].shape[1], hf_text(processor, tokens))
    return out


# ---- /v1/completions -----------------------------------------------------------------------------------------
def test_text_completion_matches_hf(server, hf_completions):
    status, r = post_to(server, "/v1/completions", completion_body(TEXT_PROMPT))
    n_prompt, text = hf_completions["text"]
    assert status == 200 and r["object"] == "text_completion" and r["model"] == NAME and r["id"].startswith("cmpl-")
    assert r["choices"] == [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}]
    assert r["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": N_NEW, "total_tokens": n_prompt + N_NEW}
    status, r = post_to(server, "/v1/completions", completion_body([TEXT_PROMPT]))  # a list of one prompt
    assert status == 200 and r["choices"][0]["text"] == text


def test_image_completion_matches_hf(server, media, hf_completions):  # noqa: F811
    status, r = post_to(server, "/v1/completions", completion_body(image_prompt(media["images"][0])))
    n_prompt, text = hf_completions["image"]
    assert status == 200 and r["choices"][0]["text"] == text
    assert r["usage"]["prompt_tokens"] == n_prompt


def test_streamed_completion_equals_whole(server, media, hf_completions):  # noqa: F811
    body = completion_body(image_prompt(media["images"][0]), stream_options={"include_usage": True})
    chunks = stream_from(server, "/v1/completions", body)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    n_prompt, text = hf_completions["image"]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == n_prompt


@pytest.mark.parametrize("body,message", [
    ({"prompt": "hi", "echo": True}, "echo: not supported by this server's /v1/completions"),
    ({"prompt": "hi", "logprobs": 2}, "logprobs: not supported by this server's /v1/completions"),
    ({"prompt": "hi", "best_of": 3}, "best_of: not supported by this server's /v1/completions"),
    ({"prompt": ["a", "b"]}, "prompt: one prompt per request (a string, or a list of content parts)"),
    ({"prompt": ""}, "prompt: must be a non-empty string or a non-empty list of content parts"),
    ({"prompt": [{"type": "video_url", "video_url": {"url": "file:///v"}}]},
     "prompt: video parts are accepted by /v1/chat/completions only"),
    ({"prompt": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]},
     "prompt[0].image_url: https URLs are not fetched by this server; send the image as a data:image/...;base64 URL "
     "or a file:// path on the server"),
    ({"prompt": "hi", "repetition_penalty": 1e-44}, "repetition_penalty: must be in [0.01, 100] (1 = off), got 1e-44"),
    ({"prompt": "<|image_pad|>"}, "prompt has 1 image and 0 video placeholders for 0 images and 0 videos; do not type "
                                  "<|image_pad|> or <|video_pad|> in the prompt text"),
])
def test_bad_completion_requests_are_400(server, body, message):
    status, r = post_to(server, "/v1/completions", {**body, "max_tokens": 1})
    assert status == 400 and r["error"]["message"] == message and r["error"]["type"] == "invalid_request_error"


# ---- /metrics -----------------------------------------------------------------------------------------------
def scrape(server) -> dict:
    """{(sample name, frozenset of labels other than model_name): value} of GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url(server, "/metrics"), timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("model_name") == NAME, s
            if not s.name.endswith(("_bucket", "_created")):
                out[(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "model_name"))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_what_was_sent(server, media):  # noqa: F811
    before = scrape(server)
    sent = [post(server, greedy(image_chat(media["images"][0])))[1],
            post_to(server, "/v1/completions", completion_body(TEXT_PROMPT, max_tokens=5))[1]]
    chunks = stream_from(server, "/v1/chat/completions", greedy([{"role": "user", "content": "hi"}], max_tokens=7,
                                                                stream_options={"include_usage": True}))
    sent.append(chunks[-1])
    status, _ = post(server, {"messages": [{"role": "user", "content": "hi"}], "top_p": 7})
    assert status == 400
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    usage = [r["usage"] for r in sent]
    assert delta("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert delta("vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usage) == N_NEW + 5 + 7
    assert delta("vllm:request_success_total", finished_reason="length") == 3
    assert delta("vllm:request_failure_total", reason="invalid_request") == 1
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        assert delta(name + "_count") == 3 and delta(name + "_sum") > 0
    assert delta("vllm:inter_token_latency_seconds_count") == sum(u["completion_tokens"] - 1 for u in usage)
    assert value(after, "vllm:num_requests_running") == value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0


def test_metrics_see_a_running_request(server):
    """While a 900-token stream decodes: one request running, none waiting, half the KV slots in use (max batch
    2); after the client hangs up, a `client_gone` failure and the slot free again."""
    before, started = scrape(server), threading.Event()
    req = urllib.request.Request(url(server, "/v1/chat/completions"), headers={"Content-Type": "application/json"},
                                 data=json.dumps(greedy([{"role": "user", "content": "hi"}], max_tokens=900,
                                                        stream=True)).encode())

    def reader():
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if b'"content": "' in line:
                    started.set()
                    return  # closing the response hangs up

    thread = threading.Thread(target=reader)
    thread.start()
    assert started.wait(timeout=120)
    during = scrape(server)
    thread.join(timeout=60)
    wait_until(lambda: value(scrape(server), "vllm:num_requests_running") == 0)
    after = scrape(server)
    assert value(during, "vllm:num_requests_running") in (0, 1)  # 0 only if the hang-up was already seen
    assert value(during, "vllm:num_requests_waiting") == 0
    assert value(during, "vllm:kv_cache_usage_perc") == value(during, "vllm:num_requests_running") / 2
    assert value(after, "vllm:request_failure_total", reason="client_gone") - \
        value(before, "vllm:request_failure_total", reason="client_gone") == 1


def test_metrics_and_models_refuse_a_foreign_host(server):
    import socket

    from raw_http import read_response

    for path in ("/metrics", "/v1/models", f"/v1/models/{NAME}"):
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode())
            assert read_response(s)[0] == 421


# ---- the official openai client -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=url(server, "/v1"), api_key="unused", max_retries=0, timeout=120)


def test_openai_client_chat(client, media, hf_qwen3_vl, processor):  # noqa: F811
    """chat.completions.create, whole and streamed, parse into the client's types with HF's text and usage."""
    img = media["images"][0]
    messages = image_chat(img)
    n_prompt, tokens = hf_chat(hf_qwen3_vl, processor, messages, [img])
    want = hf_text(processor, tokens)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=N_NEW, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, N_NEW)
    assert [m.id for m in client.models.list().data] == [NAME] and client.models.retrieve(NAME).id == NAME
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=N_NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == N_NEW and chunks[-2].choices[0].finish_reason == "length"


def test_openai_client_completions(client, hf_completions):
    n_prompt, want = hf_completions["text"]
    r = client.completions.create(model=NAME, prompt=TEXT_PROMPT, max_tokens=N_NEW, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.usage.prompt_tokens == n_prompt
    chunks = list(client.completions.create(model=NAME, prompt=TEXT_PROMPT, max_tokens=N_NEW, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_errors(client):
    """A 400 and a 404 reach the client as its BadRequestError / NotFoundError with our message."""
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], top_p=7)
    assert e.value.body["message"] == "top_p: must be in (0, 1], got 7.0"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=1)
