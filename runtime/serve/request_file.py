"""`qwen-vl-request`: the client side of the C++ runtime (runtime/cpp/): write a request file, read tokens back.

The C++ runtime takes token ids and patches, as TensorRT-LLM's C++ executor does: tokenization, the chat template
and image/video decoding stay here. A request file is a safetensors file holding what HF's processor returns:

| tensor | dtype | shape | meaning |
|---|---|---|---|
| `input_ids` | int64 | [B, S] | prompts with the vision pads expanded, right-padded |
| `attention_mask` | int64 | [B, S] | 1 for prompt tokens, 0 for padding |
| `pixel_values` | float32 | [T_img, patch_dim] | patches of every image of the batch, prompt order (optional) |
| `image_grid_thw` | int64 | [n_img, 3] | (t, h, w) in patches per image (with `pixel_values`) |
| `pixel_values_videos` | float32 | [T_vid, patch_dim] | patches of every video (optional) |
| `video_grid_thw` | int64 | [n_vid, 3] | per video (with `pixel_values_videos`) |
| `second_per_grid_ts` | float32 | [n_vid] | Qwen2.5-VL: seconds per temporal patch (MRoPE time step) |

    qwen-vl-request --model-dir A --image cat.png --prompt "What is this?" --out req.safetensors
    qwen-vl-generate --model-dir A --request req.safetensors --out tokens.json
    qwen-vl-request --model-dir A --detokenize tokens.json

Every prompt of a batch gets the same media (as trt-run). Errors: one `error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from qwen_vl_trt.model.errors import UserError


def request_tensors(pre, prompts, images=(), video=None, system=None) -> dict:
    """The request file's tensors for `prompts` (each with the same images / video), from our preprocessor."""
    from ..request import Request

    prepared = [pre.prepare(Request(p, tuple(images), video, system)) for p in prompts]
    lengths = [r.num_tokens for r in prepared]
    input_ids = np.full((len(prepared), max(lengths)), pre.manifest.pad_token_id, np.int64)  # [B, S]
    mask = np.zeros_like(input_ids)
    for b, r in enumerate(prepared):
        input_ids[b, :r.num_tokens], mask[b, :r.num_tokens] = r.input_ids, 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    n_img = len(images)
    imgs = [m for r in prepared for m in r.media[:n_img]]
    vids = [m for r in prepared for m in r.media[n_img:]]
    if imgs:
        out["pixel_values"] = np.concatenate([m.pixel_values for m in imgs]).astype(np.float32)
        out["image_grid_thw"] = np.asarray([m.grid_thw for m in imgs], np.int64)
    if vids:
        out["pixel_values_videos"] = np.concatenate([m.pixel_values for m in vids]).astype(np.float32)
        out["video_grid_thw"] = np.asarray([m.grid_thw for m in vids], np.int64)
        if pre.family.video_seconds_per_grid:
            secs = float(pre.load_video(video).second_per_grid_ts)
            out["second_per_grid_ts"] = np.full(len(vids), secs, np.float32)
    return out


def detokenize(tokenizer, result: dict) -> list[str]:
    """Texts of a `qwen-vl-generate` output object (`sequences[i].token_ids`)."""
    try:
        return [tokenizer.decode(s["token_ids"]) for s in result["sequences"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"not a qwen-vl-generate output (no sequences[].token_ids: {e})") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwen-vl-request", description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="artifacts", help="artifact directory from export_all.sh")
    ap.add_argument("--image", action="append", help="image file; repeat for several images")
    ap.add_argument("--video", help="video file (needs PyAV) or a directory of frame images")
    ap.add_argument("--prompt", action="append", help="user text; repeat for a batch, each with the same media")
    ap.add_argument("--system", help="system message")
    ap.add_argument("--out", help="request file to write (safetensors)")
    ap.add_argument("--detokenize", metavar="TOKENS_JSON",
                    help="instead: print the text of each sequence of a qwen-vl-generate output file ('-': stdin)")
    return ap


def run(args, out=sys.stdout) -> None:
    from qwen_vl_trt.model.manifest import load_manifest
    from ..prompt import Tokenizer

    if args.detokenize:
        try:
            text = sys.stdin.read() if args.detokenize == "-" else Path(args.detokenize).read_text()
            result = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {args.detokenize}: {e}") from None
        for i, t in enumerate(detokenize(Tokenizer(args.model_dir), result)):
            out.write(json.dumps({"index": i, "text": t}, ensure_ascii=False) + "\n")
        return
    if not args.out:
        raise UserError("pass --out REQUEST.safetensors (or --detokenize TOKENS_JSON)")
    if not args.prompt:
        raise UserError("pass at least one --prompt TEXT")
    from safetensors.numpy import save_file

    from ..pipeline import Preprocessor

    pre = Preprocessor(load_manifest(args.model_dir))
    save_file(request_tensors(pre, args.prompt, args.image or (), args.video, args.system), args.out)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
