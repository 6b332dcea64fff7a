"""bench_cpu_peers.py runner: onnxruntime-genai (its own venv), one multimodal request, greedy.

  python run_ortgenai.py MODEL_DIR --image IMG --prompt TEXT [--tokens 64]

Threads come from the session options in MODEL_DIR/genai_config.json (oga_graphs.py writes them).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clock import RunClock, common_args  # noqa: E402

clock = RunClock()


def chat_prompt(text: str) -> str:
    """The Qwen3-VL chat template's text for one user turn holding one image then `text`."""
    return ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + text
            + "<|im_end|>\n<|im_start|>assistant\n")


def main() -> None:
    args = common_args()
    import onnxruntime_genai as og

    model = og.Model(args.artifacts)
    processor = model.create_multimodal_processor()
    clock.ready()
    clock.request()
    images = og.Images.open(args.image)
    inputs = processor(chat_prompt(args.prompt), images=images)
    params = og.GeneratorParams(model)
    prompt_len = int(inputs["input_ids"].shape()[-1]) if hasattr(inputs["input_ids"], "shape") else 0
    params.set_search_options(do_sample=False, top_k=1, max_length=prompt_len + args.tokens,
                              min_length=prompt_len + args.tokens)
    gen = og.Generator(model, params)
    gen.set_inputs(inputs)
    for _ in range(args.tokens):
        gen.generate_next_token()
        clock.token(int(gen.get_next_tokens()[0]))
    clock.emit({"prompt_tokens": prompt_len})


if __name__ == "__main__":
    main()
