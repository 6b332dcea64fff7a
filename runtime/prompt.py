"""Tokenizer, chat template and vision placeholder expansion (no torch, no transformers).

- `Tokenizer(dir)`: `tokenizers.Tokenizer.from_file(dir/tokenizer.json)` + the checkpoint's chat template.
- Chat templates render in a jinja2 environment with HF `apply_chat_template` semantics
  (`transformers/utils/chat_template_utils.py`): `ImmutableSandboxedEnvironment(trim_blocks=True,
  lstrip_blocks=True)`, loop controls, a `{% generation %}` block, `tojson` without HTML escaping,
  `raise_exception`, `strftime_now`; the tokenizer's special tokens are template variables.
- `build_prompt`: render, then replace each `<|image_pad|>` / `<|video_pad|>` in order by its expansion
  (as HF's processor does), tokenize, and mark pad tokens in `mm_token_type_ids` (0 text, 1 image, 2 video).
- `IncrementalDecoder`: streaming detokenizer that never emits half a UTF-8 character.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import numpy as np
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from qwen_vl_trt.model.errors import ArtifactError, UserError
from qwen_vl_trt.model.families import family_of

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (HF's AssistantTracker without tracking)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def load_chat_template(directory: str | Path) -> str:
    """chat_template.jinja, else chat_template.json["chat_template"], else tokenizer_config.json["chat_template"]."""
    d = Path(directory)
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (d / name).exists():
            template = json.loads((d / name).read_text()).get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                template = {t["name"]: t["template"] for t in template}.get("default")
            if template:
                return template
    raise ArtifactError(f"{d} has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json); "
                        "copy chat_template.jinja from the original checkpoint")


def _special_tokens(directory: Path) -> dict[str, str]:
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return {}
    cfg = json.loads(path.read_text())
    out = {}
    for key in _SPECIAL_KEYS:
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            out[key] = str(value)
    return out


class Tokenizer:
    """`tokenizer.json` + chat template of a checkpoint / artifact directory."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if not (d / "tokenizer.json").exists():
            raise ArtifactError(f"{d / 'tokenizer.json'} is missing; copy it from the original checkpoint")
        self.tok = _HFTokenizer.from_file(str(d / "tokenizer.json"))
        self.special_tokens = _special_tokens(d)
        self.chat_template = load_chat_template(d)
        self._template = compile_chat_template(self.chat_template)

    def token_id(self, token: str) -> int:
        tid = self.tok.token_to_id(token)
        if tid is None:
            raise ArtifactError(f"tokenizer has no token {token!r}; use the checkpoint's own tokenizer.json")
        return tid

    def encode(self, text: str) -> np.ndarray:
        """Token ids int64 [S] (Qwen adds no BOS/EOS: same as HF's `tokenizer(text)`)."""
        return np.asarray(self.tok.encode(text, add_special_tokens=True).ids, dtype=np.int64)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat template's text for `messages` (as HF `apply_chat_template(..., tokenize=False)`)."""
        variables = {**self.special_tokens, **kwargs}
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **variables)


@dataclass(frozen=True)
class Conversation:
    """A whole chat in place of one user text (the OpenAI server's requests): HF content-item messages
    (system / user / assistant; content a string or a list of {"type": "text" | "image" | "video"} items)."""

    messages: tuple

    def media_types(self) -> list[str]:
        """"image" / "video" of each media item of the user messages, in order (what the template renders)."""
        return [item["type"] for m in self.messages if m["role"] == "user" and not isinstance(m["content"], str)
                for item in m["content"] if item["type"] in ("image", "video")]


@dataclass(frozen=True)
class RawPrompt:
    """A completion prompt (the server's /v1/completions): text used as it is, without the chat template, with
    each image where its item stands, as the Qwen chat templates render one (`<|vision_start|><|image_pad|>
    <|vision_end|>`, expanded like any other by `build_prompt`)."""

    items: tuple  # HF content items: {"type": "text", "text": str} or {"type": "image"}

    def media_types(self) -> list[str]:
        return [item["type"] for item in self.items if item["type"] != "text"]

    def render(self) -> str:
        return "".join(item["text"] if item["type"] == "text" else VISION_START + IMAGE_PAD + VISION_END
                       for item in self.items)


def build_messages(prompt: "str | Conversation | RawPrompt", system: str | None = None, n_images: int = 0,
                   video: bool = False) -> list[dict]:
    """[system?], user: images first, then the video, then the text (HF content-item format).
    A `Conversation` is returned as it is, after checking that its media are the images, then the video; a
    `RawPrompt` (images only) is returned itself: `build_prompt` renders it without the template."""
    if isinstance(prompt, RawPrompt):
        if system is not None or video or prompt.media_types() != ["image"] * n_images:
            raise UserError("a completion prompt carries no system message and no video, only its images")
        return prompt
    if isinstance(prompt, Conversation):
        if system is not None:
            raise ValueError("a Conversation carries its own system message")
        if prompt.media_types() != ["image"] * n_images + ["video"] * video:
            raise UserError(f"the conversation must show its {n_images} images before the video, and at most one "
                            "video; reorder the media items")
        return [dict(m) for m in prompt.messages]
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    content = [{"type": "image"} for _ in range(n_images)]
    if video:
        content.append({"type": "video"})
    content.append({"type": "text", "text": prompt})
    messages.append({"role": "user", "content": content})
    return messages


def image_expansion(grid_thw, merge_size: int) -> str:
    """`<|image_pad|>` x (t*h*w / merge^2), the text each image placeholder becomes."""
    t, h, w = (int(v) for v in grid_thw)
    return IMAGE_PAD * (t * h * w // merge_size ** 2)


def qwen3_video_expansion(grid_thw, timestamps, merge_size: int) -> str:
    """Qwen3-VL: per temporal patch `<{t:.1f} seconds><|vision_start|><|video_pad|>*(h*w/m^2)<|vision_end|>`.

    The expansion replaces the template's whole `<|vision_start|><|video_pad|><|vision_end|>` (see
    `collapse_video_wrappers`): each frame carries its own start/end pair, with no outer pair around them."""
    t, h, w = (int(v) for v in grid_thw)
    if len(timestamps) != t:
        raise ValueError(f"{len(timestamps)} timestamps for {t} temporal patches")
    frame = VISION_START + VIDEO_PAD * (h * w // merge_size ** 2) + VISION_END
    return "".join(f"<{float(ts):.1f} seconds>" + frame for ts in timestamps)


def qwen2_5_video_expansion(grid_thw, merge_size: int) -> str:
    """Qwen2.5-VL: one run of t*h*w / m^2 `<|video_pad|>`."""
    t, h, w = (int(v) for v in grid_thw)
    return VIDEO_PAD * (t * h * w // merge_size ** 2)


def collapse_video_wrappers(text: str) -> str:
    """Qwen3-VL: `<|vision_start|><|video_pad|><|vision_end|>` -> `<|video_pad|>`, so that the per-frame expansion
    is not wrapped in a second start/end pair.

    This is Qwen's reference processing, which the released models were trained with: `Qwen3VLProcessor` of
    transformers 4.57.x-5.9 replaces the wrapped placeholder when the template wrote one, else the bare
    `<|video_pad|>`. transformers 5.10-5.24 replaced only the inner `<|video_pad|>` and kept an outer pair (two
    extra tokens per video, shifting every later MRoPE position); 5.25 restored the reference form
    (`Qwen3VLProcessor.get_text_with_replacements`). The rule depends only on the rendered template text, never on
    the installed library. docs/upstream-drift.md records the versions."""
    return text.replace(VISION_START + VIDEO_PAD + VISION_END, VIDEO_PAD)


def expand_placeholders(text: str, image_texts: list[str], video_texts: list[str]) -> str:
    """Replace the i-th `<|image_pad|>` / `<|video_pad|>` of `text` by `image_texts[i]` / `video_texts[i]`."""
    n_img, n_vid = text.count(IMAGE_PAD), text.count(VIDEO_PAD)
    if n_img != len(image_texts) or n_vid != len(video_texts):
        raise UserError(f"prompt has {n_img} image and {n_vid} video placeholders for {len(image_texts)} images and "
                        f"{len(video_texts)} videos; do not type {IMAGE_PAD} or {VIDEO_PAD} in the prompt text")
    images, videos = iter(image_texts), iter(video_texts)
    pattern = re.compile(f"{re.escape(IMAGE_PAD)}|{re.escape(VIDEO_PAD)}")
    return pattern.sub(lambda m: next(images) if m.group() == IMAGE_PAD else next(videos), text)


@dataclass(frozen=True)
class Prompt:
    text: str  # expanded text that was tokenized
    input_ids: np.ndarray  # int64 [S]
    mm_token_type_ids: np.ndarray  # int64 [S]: 0 text, 1 image pad, 2 video pad


def qwen3_video_prompt(text: str, video_grids, video_timestamps, merge_size: int) -> tuple[str, list[str]]:
    """Qwen3-VL's `video_prompt` (model/families.py): the template text without the outer start/end pair of each
    video placeholder, and the per-frame expansion of each video."""
    if video_grids:
        text = collapse_video_wrappers(text)
    return text, [qwen3_video_expansion(g, ts, merge_size) for g, ts in zip(video_grids, video_timestamps, strict=True)]


def qwen2_5_video_prompt(text: str, video_grids, video_timestamps, merge_size: int) -> tuple[str, list[str]]:
    """Qwen2.5-VL's `video_prompt`: the text as rendered, one run of pads per video (no timestamps)."""
    return text, [qwen2_5_video_expansion(g, merge_size) for g in video_grids]


def build_prompt(tokenizer: Tokenizer, messages: "list[dict] | RawPrompt", *, image_grids=(), video_grids=(), video_timestamps=(),
                 family: str = "qwen3_vl", merge_size: int = 2, add_generation_prompt: bool = True) -> Prompt:
    """Render `messages`, expand vision placeholders for the given grids, tokenize. `family`: the config.json
    model_type, whose `video_prompt` expands the videos (model/families.py)."""
    if isinstance(messages, RawPrompt):
        text = messages.render()
    else:
        text = tokenizer.render(messages, add_generation_prompt=add_generation_prompt)
    image_texts = [image_expansion(g, merge_size) for g in image_grids]
    text, video_texts = family_of(family).load("video_prompt")(text, video_grids, video_timestamps, merge_size)
    text = expand_placeholders(text, image_texts, video_texts)
    ids = tokenizer.encode(text)
    types = np.zeros_like(ids)
    types[ids == tokenizer.token_id(IMAGE_PAD)] = 1
    types[ids == tokenizer.token_id(VIDEO_PAD)] = 2
    return Prompt(text, ids, types)


class IncrementalDecoder:
    """Streaming detokenizer: `push(token_id) -> str` returns only complete characters; `flush()` the rest.

    Keeps a window `ids[prefix:]` and emits the text beyond what `ids[prefix:read]` decoded to, holding back
    while the new text ends in U+FFFD (an incomplete UTF-8 sequence split across byte-level tokens).
    The concatenation of all returned pieces equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (possibly U+FFFD when the stream ended mid-character)."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):]
