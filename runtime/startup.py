"""Start-up: `load_model_and_preprocessor(directory, backend, **load_model_kwargs)` -> (Model, Preprocessor), the
two made at the same time.

The Preprocessor's cost is `tokenizers.Tokenizer.from_file` of tokenizer.json (11 MB for Qwen3-VL: about a second on
the 2-core machine of docs/benchmarks.md), and that call holds the GIL for its whole length. ONNX Runtime releases
the GIL while it creates a session (seconds of reading, optimizing and prepacking weights). So the sessions are
created on threads (runtime/backends/ort.py `_open_concurrently`) and the tokenizer is loaded on this thread once
every session's creation has begun (`started`): were the tokenizer loaded first, the session threads would wait for
the GIL before they could even enter ONNX Runtime. Both are done when this returns: "ready" means ready to serve.

The image-decode worker process (runtime/media_guard.py) is started alongside, on a thread of its own
(`prestart_in_background`): an interpreter and PIL starting take 60-80 ms, which the first image's request waited
for otherwise. It is not waited for: a request that comes before it is ready waits for it as it would have.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


def load_model_and_preprocessor(directory, backend: str = "auto", **load_model_kwargs):
    """(generate.load_model(directory, backend, **load_model_kwargs), pipeline.Preprocessor of its manifest)."""
    from qwen_vl_trt.model.manifest import load_manifest

    from . import media_guard
    from .generate import load_model
    from .pipeline import Preprocessor

    media_guard.prestart_in_background()
    started = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="load-model") as pool:
        model = pool.submit(load_model, directory, backend, started=started, **load_model_kwargs)
        while not started.wait(0.005) and not model.done():
            pass
        if model.done() and model.exception() is not None:
            return model.result(), None  # raises the loader's error (a bad backend, a missing graph...)
        try:
            pre = Preprocessor(load_manifest(directory))
        except BaseException:
            model.result()  # the sessions' error first, if any; else the Preprocessor's
            raise
        return model.result(), pre
