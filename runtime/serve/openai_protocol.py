"""OpenAI chat-completions requests -> pipeline requests, and results -> OpenAI response / chunk objects.

What a request may hold (everything else OpenAI or vLLM defines is ignored when absent or at its default, refused
with a 400 naming the field otherwise: `_UNSUPPORTED`; unknown fields are ignored, as OpenAI-compatible servers do):

| field | accepted |
|---|---|
| `messages` | `system` / `developer` (text), `user` (text, `image_url`, `video_url` / `video`), `assistant` (text) |
| `image_url.url` | `data:image/...;base64,...` or `file:///local/path`; http(s) is refused (nothing is fetched) |
| `video_url.url`, `video` | `file:///local/path` (video file or frame directory); one, after the images |
| `max_tokens`, `max_completion_tokens` | >= 1; default: generation_config.json (else 128) within the KV cache |
| `temperature`, `top_p`, `seed` | as `trt-run`; defaults from generation_config.json; temperature < 1e-5 = greedy |
| `top_k`, `repetition_penalty`, `ignore_eos` | extensions, as vLLM's |
| `min_p`, `min_tokens`, `stop_token_ids` | extensions, as vLLM's (runtime/sampling.py) |
| `stop` | a string or a list of up to 4 strings; the text ends before the first one found |
| `include_stop_str_in_output`, `skip_special_tokens` | extensions, as vLLM's (defaults false, true) |
| `n` | 1 to 16 choices, each its own sequence; with a seed, choice i uses seed + i (vLLM) |
| `logprobs`, `top_logprobs` | true, 0 to 20: log-softmax of the raw logits (vLLM's default raw_logprobs) |
| `response_format` | `text`, `json_object`, `json_schema` (`json_schema.schema`) |
| `structured_outputs` | vLLM's: one of `json` (a schema), `regex`, `choice` (strings), `json_object: true` |
| `guided_json`, `guided_regex`, `guided_choice` | vLLM's older names of the same |
| `stream`, `stream_options.include_usage` | SSE chunks (`chat.completion.chunk`), then `data: [DONE]` |

`file://` media only inside the directory the operator allows (runtime/serve/local_media.py); at most
`MediaPolicy.max_images` images, refused before the next one is decoded. Numbers are finite and in range
(integers within 64 bits), strings valid Unicode (no lone surrogates): anything else is a 400.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import math
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

import json

from .. import prompt
from ..request import FieldError, Request, Sampling, check_field
from ..structured import Grammar, GrammarError
from .local_media import LocalMediaPolicy, MediaRefused

MAX_STOP = 4
MAX_IMAGES = 16  # default images per request (`qwen-vl-serve --max-images-per-request`)
INT_RANGE = (-(1 << 63), (1 << 63) - 1)  # integer fields: what a C long long holds
# sampling fields of a request and their JSON types; their ranges are runtime/request.py's (a temperature below
# 1e-5 is greedy there: logits / T would overflow float32)
_SAMPLING = (("temperature", float), ("top_p", float), ("top_k", int), ("repetition_penalty", float), ("seed", int),
             ("min_p", float), ("min_tokens", int))
# OpenAI and vLLM fields we do not implement: refused unless absent or at their no-op value
_UNSUPPORTED = {"tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
                "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "audio": (),
                "modalities": (["text"],), "prediction": (), "web_search_options": (),
                "bad_words": ([],), "echo": (False,), "prompt_logprobs": (), "allowed_token_ids": (),
                "best_of": (1,), "use_beam_search": (False,), "length_penalty": (1, 1.0),
                "truncate_prompt_tokens": (), "guided_grammar": (), "guided_decoding_backend": (),
                "guided_whitespace_pattern": (), "structural_tag": (), "logits_processors": (),
                "spaces_between_special_tokens": (True,), "return_tokens_as_token_ids": (False,),
                "continue_final_message": (False,), "add_generation_prompt": (True,), "chat_template": (),
                "chat_template_kwargs": ({},), "documents": (), "mm_processor_kwargs": ({},), "vllm_xargs": (),
                "thinking_token_budget": ()}
# structured_outputs keys (vLLM) -> Grammar kind; the others of vLLM's StructuredOutputsParams are refused
_STRUCTURED = {"json": "json_schema", "regex": "regex", "choice": "choice", "json_object": "json_object"}
_LEGACY = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice"}


class ProtocolError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI error `type` and `code`, `param` (the field)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.code, self.param)


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class MediaPolicy:
    """What media a request may carry: local files (runtime/serve/local_media.py) and how many images."""

    local: LocalMediaPolicy = field(default_factory=LocalMediaPolicy)
    max_images: int = MAX_IMAGES


@dataclass(frozen=True)
class ChatRequest:
    request: Request  # the conversation (prompt.Conversation), images (bytes of data URLs or local paths, in
    # conversation order), video (a local path), max_tokens, sampling, stop strings, ignore_eos
    stream: bool
    include_usage: bool

    @property
    def n(self) -> int:
        return self.request.n


def _typed(body: dict, key: str, kind, param: str | None = None):
    """body[key] if it is of `kind` (int is a float; bool is not a number), None if absent or null."""
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        name = {float: "a number", int: "an integer", bool: "a boolean", str: "a string", list: "an array",
                dict: "an object"}[kind]
        raise ProtocolError(f"{param or key}: must be {name}, got {type(value).__name__}", param or key)
    if kind is int and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise ProtocolError(f"{param or key}: integer out of range", param or key)
    if kind is float:
        return _finite(value, param or key)
    return _valid_text(value, param or key) if kind is str else value


def _finite(value, param: str) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ProtocolError(f"{param}: must be a finite number", param)
    return number


def _valid_text(text: str, param: str) -> str:
    """`text` if it encodes as UTF-8 (JSON's \\ud800 escapes decode to lone surrogates, which do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{param}: not valid Unicode text (a lone surrogate escape?)", param) from None
    return text


def parse_chat_request(body, media: MediaPolicy = MediaPolicy()) -> ChatRequest:
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    for key, allowed in _UNSUPPORTED.items():
        if key in body and body[key] is not None and body[key] not in allowed:
            raise ProtocolError(f"{key}: not supported by this server", key)
    max_tokens = _typed(body, "max_completion_tokens", int)
    max_tokens = max_tokens if max_tokens is not None else _typed(body, "max_tokens", int)
    values = {key: _typed(body, key, kind) for key, kind in _SAMPLING}
    options = _typed(body, "stream_options", dict) or {}
    n = _typed(body, "n", int)
    n = 1 if n is None else n
    with _named_fields():
        check_field("max_new_tokens", max_tokens)
        check_field("n", n)
        sampling = Sampling(**values, stop_token_ids=_token_ids(body), logprobs=_logprobs(body))
    grammar, stop = parse_grammar(body), _stop(body)
    conversation, images, video = parse_messages(_typed(body, "messages", list), media)
    with _named_fields():
        request = Request(conversation, images, video, None, max_tokens, sampling, stop,
                          bool(_typed(body, "ignore_eos", bool)), n, _flag(body, "skip_special_tokens", True),
                          _flag(body, "include_stop_str_in_output", False), grammar)
    return ChatRequest(request, bool(_typed(body, "stream", bool)),
                       bool(_typed(options, "include_usage", bool, "stream_options.include_usage")))


@contextlib.contextmanager
def _named_fields():
    """A FieldError (the rule is runtime/request.py's) -> a 400 naming the field as the body names it."""
    try:
        yield
    except FieldError as e:
        key = {"max_new_tokens": "max_tokens", "logprobs": "top_logprobs"}.get(e.field, e.field)
        raise ProtocolError(f"{key}: must be {e.need}, got {e.value}", key) from None


def _flag(body: dict, key: str, default: bool) -> bool:
    value = _typed(body, key, bool)
    return default if value is None else value


def _token_ids(body: dict) -> tuple:
    ids = _typed(body, "stop_token_ids", list) or []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ProtocolError("stop_token_ids: must be a list of integers", "stop_token_ids")
    return tuple(ids)


def _logprobs(body: dict) -> int | None:
    """OpenAI's `logprobs` (bool) and `top_logprobs` (0-20, only with logprobs) -> alternatives per token, or
    None when off."""
    top = _typed(body, "top_logprobs", int)
    if not _typed(body, "logprobs", bool):
        if top:
            raise ProtocolError("top_logprobs: needs logprobs: true", "top_logprobs")
        return None
    return top or 0


def parse_grammar(body: dict) -> Grammar | None:
    """The structured output a request asks for (`response_format`, `structured_outputs` or vLLM's older
    `guided_*` fields; at most one of them), or None."""
    found = []
    fmt = _typed(body, "response_format", dict)
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            found.append(("response_format", _grammar("json_object", "", "response_format")))
        elif kind == "json_schema":
            spec = _typed(fmt, "json_schema", dict, "response_format.json_schema") or {}
            schema = spec.get("schema", spec.get("json_schema"))
            if not isinstance(schema, dict):
                raise ProtocolError("response_format.json_schema.schema: must be a JSON schema object",
                                    "response_format")
            found.append(("response_format", _grammar("json_schema", json.dumps(schema), "response_format")))
        elif kind != "text":
            raise ProtocolError(f"response_format.type: {kind!r} is not supported (text, json_object, json_schema)",
                                "response_format")
    outputs = _typed(body, "structured_outputs", dict)
    if outputs is not None:
        found += [(f"structured_outputs.{k}", v) for k, v in _structured(outputs, "structured_outputs").items()]
    for key, name in _LEGACY.items():
        if body.get(key) is not None:
            found += [(key, v) for v in _structured({name: body[key]}, key).values()]
    if len(found) > 1:
        raise ProtocolError(f"{found[1][0]}: only one structured output per request (also {found[0][0]})",
                            found[1][0])
    return found[0][1] if found else None


def _grammar(kind: str, source: str, param: str) -> Grammar:
    try:
        return Grammar(kind, source)
    except GrammarError as e:  # too large
        raise ProtocolError(f"{param}: {e}", param) from None


def _structured(spec: dict, where: str) -> dict:
    """vLLM's StructuredOutputsParams (json, regex, choice, json_object) -> {field: Grammar}."""
    out = {}
    for key, value in spec.items():
        if value is None or (key == "json_object" and value is False) or (
                key == "disable_any_whitespace" and isinstance(value, bool)):  # JSON is always compact here
            continue
        param = f"{where}.{key}" if where == "structured_outputs" else where
        if key == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ProtocolError(f"{param}: not a JSON schema (invalid JSON)", param) from None
        if key == "json" and isinstance(value, dict):
            out[key] = _grammar("json_schema", json.dumps(value), param)
        elif key == "regex" and isinstance(value, str):
            out[key] = _grammar("regex", _valid_text(value, param), param)
        elif key == "choice" and isinstance(value, list) and value and all(isinstance(c, str) for c in value):
            out[key] = _grammar("choice", json.dumps([_valid_text(c, param) for c in value]), param)
        elif key == "json_object" and value is True:
            out[key] = _grammar("json_object", "", param)
        elif key in _STRUCTURED:
            need = {"json": "a JSON schema", "regex": "a string", "choice": "a non-empty list of strings",
                    "json_object": "a boolean"}[key]
            raise ProtocolError(f"{param}: must be {need}", param)
        else:
            raise ProtocolError(f"{param}: not supported by this server (json, regex, choice, json_object)", param)
    return out


def _stop(body: dict) -> tuple:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [] if stop is None else None
    if stops is None or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise ProtocolError(f"stop: must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    return tuple(_valid_text(s, "stop") for s in stops)


def parse_messages(messages, media: MediaPolicy = MediaPolicy()) -> tuple[prompt.Conversation, tuple, str | None]:
    """OpenAI messages -> (HF content-item Conversation, images in order, the video path or None)."""
    if not messages:
        raise ProtocolError("messages: must be a non-empty array", "messages")
    out, images, videos = [], [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ProtocolError(f"{where}: must be an object", where)
        role = m.get("role")
        role = {"developer": "system"}.get(role, role) if isinstance(role, str) else None
        if role not in ("system", "user", "assistant"):
            raise ProtocolError(f"{where}.role: {m.get('role')!r} is not supported (system, developer, user, "
                                "assistant)", f"{where}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise ProtocolError(f"{where}: tool calls are not supported", where)
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": _valid_text(content or "", f"{where}.content")})
            continue
        if not isinstance(content, list):
            raise ProtocolError(f"{where}.content: must be a string or an array of content parts", f"{where}.content")
        items = []
        for j, part in enumerate(content):
            items.append(_content_part(part, role, f"{where}.content[{j}]", images, videos, media.max_images))
        out.append({"role": role, "content": items})
    if len(videos) > 1 or (videos and images and videos[0][0] < images[-1][0]):
        raise ProtocolError("messages: at most one video per request, after all images", "messages")
    image_data = tuple(_local(data, where, "image", media.local) for _, data, where in images)
    video = _local(videos[0][1], videos[0][2], "video", media.local) if videos else None
    return prompt.Conversation(tuple(out)), image_data, video


def _local(data, where: str, what: str, policy: LocalMediaPolicy):
    """Image bytes as they are; a file:// URL (str) -> the path the policy allows, else a 400."""
    if not isinstance(data, str):
        return data
    try:
        return policy.resolve(data, what)
    except MediaRefused as e:
        raise ProtocolError(str(e), where) from None


def _content_part(part, role: str, where: str, images: list, videos: list, max_images: int) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return {"type": "text", "text": _typed(part, "text", str, f"{where}.text") or ""}
    if kind not in ("image_url", "video_url", "video"):
        raise ProtocolError(f"{where}: unsupported content part type {kind!r} (text, image_url, video_url)", where)
    if role != "user":
        raise ProtocolError(f"{where}: {kind} parts are only allowed in user messages", where)
    ref = part.get(kind)
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise ProtocolError(f"{where}.{kind}: must be an object with a string `url`", f"{where}.{kind}")
    order = len(images) + len(videos)
    if kind == "image_url":
        if len(images) >= max_images:
            raise ProtocolError(f"messages: at most {max_images} images per request", "messages")
        images.append((order, _image_data(url, f"{where}.image_url"), f"{where}.image_url"))
        return {"type": "image"}
    videos.append((order, _file_url(url, f"{where}.{kind}", "video"), f"{where}.{kind}"))
    return {"type": "video"}


def _image_data(url: str, where: str):
    """data:image/...;base64 -> bytes; file:// -> the URL (str), resolved once the whole request parsed."""
    if not url.startswith("data:"):
        return _file_url(url, where, "image")
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
        raise ProtocolError(f"{where}: data URLs must be data:image/<type>;base64,<data>", where)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"{where}: invalid base64 data ({e})", where) from None


def _file_url(url: str, where: str, what: str) -> str:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        raise ProtocolError(f"{where}: {scheme} URLs are not fetched by this server; send the {what} as "
                            + ("a data:image/...;base64 URL or " if what == "image" else "")
                            + "a file:// path on the server", where)
    if scheme != "file":
        raise ProtocolError(f"{where}: unsupported URL {url[:40]!r}; use "
                            + ("a data:image/...;base64 URL or " if what == "image" else "") + "file:///path", where)
    return url


# ---- responses -----------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return completion_of(cid, model, [choice(0, text, finish_reason)], use)


def choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict:
    """One choice of a `chat.completion`; `logprobs`: logprobs_content()'s object, or None."""
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
            "logprobs": logprobs}


def completion_of(cid: str, model: str, choices: list, use: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def logprobs_content(tokenizer, entries) -> dict:
    """sampling.TokenLogprobs of generated tokens -> OpenAI's `{"content": [{token, logprob, bytes, top_logprobs}]}`;
    a token's text is its own decoding (a piece of a UTF-8 character decodes to U+FFFD, `bytes` then hold that)."""
    def item(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def chunk(cid: str, model: str, delta: dict | None, finish_reason: str | None = None, use: dict | None = None,
          index: int = 0, logprobs: dict | None = None) -> dict:
    """One `chat.completion.chunk` of choice `index`; `delta` None = the usage-only chunk (empty choices)."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": logprobs}]
    obj = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}
    if use is not None:
        obj["usage"] = use
    return obj


def models_list(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "qwen-vl-trt"}]}
