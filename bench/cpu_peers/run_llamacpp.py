"""bench_cpu_peers.py runner: llama.cpp through llama-cpp-python (its own venv), text GGUF + `--mmproj` vision GGUF.

  python run_llamacpp.py MODEL.gguf --image IMG --prompt TEXT [--tokens 64] [--threads 2] --option mmproj=MMPROJ.gguf

The prompt goes through libmtmd (which puts <|vision_start|> / <|vision_end|> around the image itself), the image
chunk through `mtmd_helper_eval_chunk_single` (M-RoPE positions), text chunks through `Llama.eval`; greedy is
the argmax of the last row's logits (no sampler chain).
"""
from __future__ import annotations

import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clock import RunClock, common_args  # noqa: E402

clock = RunClock()


def main() -> None:
    args = common_args()
    import numpy as np
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=args.artifacts, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.print_timings = False
    params.n_threads = args.threads
    ctx = mtmd.mtmd_init_from_file(args.options["mmproj"].encode(), llm.model, params)
    if ctx is None:
        raise SystemExit(f"cannot load {args.options['mmproj']}")
    n_vocab = llm.n_vocab()
    clock.ready()

    clock.request()
    data = open(args.image, "rb").read()
    bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(ctx, (ctypes.c_uint8 * len(data)).from_buffer(bytearray(data)),
                                                   len(data), False)
    marker = mtmd.mtmd_default_marker().decode()
    text = f"<|im_start|>user\n{marker}{args.prompt}<|im_end|>\n<|im_start|>assistant\n".encode()
    inp = mtmd.mtmd_input_text()
    inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), True, True
    chunks = mtmd.mtmd_input_chunks_init()
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1) != 0:
        raise SystemExit("mtmd_tokenize failed")
    llm.reset()
    prompt_tokens = 0
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            llm.eval([ptr[j] for j in range(n.value)])
            prompt_tokens += n.value
        else:
            new_n_past = llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_eval_chunk_single(ctx, llm._ctx.ctx, chunk, llama_cpp.llama_pos(llm.n_tokens),
                                                    llama_cpp.llama_seq_id(0), llm.n_batch, False,
                                                    ctypes.byref(new_n_past))
            if rc != 0:
                raise SystemExit(f"image chunk failed ({rc})")
            prompt_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            llm.n_tokens = new_n_past.value
    for step in range(args.tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
        tok = int(np.argmax(logits))
        clock.token(tok)
        if step < args.tokens - 1:
            llm.eval([tok])
    clock.emit({"prompt_tokens": prompt_tokens})


if __name__ == "__main__":
    main()
