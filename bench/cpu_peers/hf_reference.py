"""bench_cpu_peers.py's reference: HF transformers fp32 `generate` (greedy, EOS ignored) on the checkpoint.

  python hf_reference.py CKPT --image IMG --prompt TEXT --tokens 64 --out tokens.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import torch
    import transformers
    from PIL import Image

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForImageTextToText.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    proc = transformers.AutoProcessor.from_pretrained(args.checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(text=[text], images=[Image.open(args.image).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    n = inputs["input_ids"].shape[1]
    args.out.write_text(json.dumps({"tokens": out[0, n:].tolist(), "prompt_tokens": n,
                                    "transformers": transformers.__version__}))
    print(f"HF: {n} prompt tokens, {out.shape[1] - n} new -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
