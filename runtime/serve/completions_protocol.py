"""OpenAI `/v1/completions` requests -> pipeline requests, and results -> `text_completion` objects.

The prompt is used as it is, without the chat template (runtime/prompt.py `RawPrompt`):

| field | accepted |
|---|---|
| `prompt` | a string, a list of one string, or (this server's extension, for images) a list of content parts: `{"type": "text", "text"}` and `{"type": "image_url", "image_url": {"url"}}` (data URL or allowed file://, as in chat); each image is rendered where it stands as `<|vision_start|><|image_pad|><|vision_end|>` |
| `echo`, `suffix`, `best_of`, `logprobs` | refused unless absent or at their no-op value (false, "", 1, null) |
| everything else | as `/v1/chat/completions` (runtime/serve/openai_protocol.py): max_tokens, sampling, stop, n, stream, stream_options, ignore_eos and the limits |

The sampling fields are parsed by `parse_chat_request` itself (the prompt is passed to it as one user message and
then swapped for the raw prompt), so every field the chat endpoint accepts is accepted here with the same rule.
"""
from __future__ import annotations

import dataclasses
import time
import uuid

from ..prompt import Conversation, RawPrompt
from .openai_protocol import MediaPolicy, ProtocolError, parse_chat_request

_PROMPT_PATH = "messages[0].content"  # where parse_chat_request names the prompt's parts
_NO_OP = {"echo": (False,), "suffix": ("",), "best_of": (1,), "logprobs": ()}
_CHAT_ONLY = ("messages", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice")


def parse_completion_request(body, media: MediaPolicy = MediaPolicy()):
    """A completions body -> the ChatRequest of parse_chat_request whose `request.prompt` is a RawPrompt."""
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    for key, allowed in _NO_OP.items():
        if body.get(key) is not None and body[key] not in allowed:
            raise ProtocolError(f"{key}: not supported by this server's /v1/completions", key)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and any(isinstance(p, str) for p in prompt):
        raise ProtocolError("prompt: one prompt per request (a string, or a list of content parts)", "prompt")
    if not isinstance(prompt, (str, list)) or not prompt:
        raise ProtocolError("prompt: must be a non-empty string or a non-empty list of content parts", "prompt")
    if isinstance(prompt, list) and any(isinstance(p, dict) and p.get("type") in ("video_url", "video") for p in prompt):
        raise ProtocolError("prompt: video parts are accepted by /v1/chat/completions only", "prompt")
    chat_body = {k: v for k, v in body.items() if k not in _CHAT_ONLY}
    chat_body["messages"] = [{"role": "user", "content": prompt}]
    try:
        chat = parse_chat_request(chat_body, media)
    except ProtocolError as e:
        raise _renamed(e) from None
    raw = RawPrompt(tuple(_content(chat.request.prompt)))
    return dataclasses.replace(chat, request=dataclasses.replace(chat.request, prompt=raw))


def _content(conversation: Conversation) -> list[dict]:
    content = conversation.messages[0]["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _renamed(e: ProtocolError) -> ProtocolError:
    """The error of the one-message chat, naming `prompt` where it named the message's content."""
    def fix(text):
        return text.replace(_PROMPT_PATH, "prompt").replace("messages:", "prompt:") if text else text

    return ProtocolError(fix(str(e)), fix(e.param), e.status, e.code, e.kind)


# ---- responses -----------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def text_completion(cid: str, model: str, text: str | None, finish_reason: str | None, use: dict | None = None,
                    ) -> dict:
    """A `text_completion` object: the whole answer, or one streamed chunk (`text` None: the usage-only chunk
    of `stream_options.include_usage`, with empty choices)."""
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]
    obj = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        obj["usage"] = use
    return obj
