"""bench_cpu_peers.py runner: OpenVINO GenAI's VLMPipeline (its own venv) on an `optimum-cli export openvino` dir.

  python run_openvino.py OV_DIR --image IMG --prompt TEXT [--tokens 64] [--threads 2] [--option precision=f32]

The pipeline applies the chat template and inserts the image tags itself; a StreamerBase subclass sees each
token id as it is produced. `precision=f32` sets INFERENCE_PRECISION_HINT and KV_CACHE_PRECISION to f32 (the
fp32 system, HF-exact); otherwise the plugin's defaults (the int4 system).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clock import RunClock, common_args  # noqa: E402

clock = RunClock()


def main() -> None:
    args = common_args()
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai
    from PIL import Image

    props = {"INFERENCE_NUM_THREADS": args.threads}
    if args.options.get("precision") == "f32":
        props.update(INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
    pipe = ov_genai.VLMPipeline(args.artifacts, "CPU", **props)
    clock.ready()

    class Streamer(ov_genai.StreamerBase):
        def write(self, token):
            for t in (token if isinstance(token, (list, tuple)) else [token]):
                clock.token(t)
            return ov_genai.StreamingStatus.RUNNING

        def end(self):
            pass

    cfg = ov_genai.GenerationConfig()
    cfg.max_new_tokens = args.tokens
    cfg.min_new_tokens = args.tokens
    cfg.ignore_eos = True
    cfg.do_sample = False
    clock.request()
    image = ov.Tensor(np.asarray(Image.open(args.image).convert("RGB"))[None])
    pipe.generate(args.prompt, images=[image], generation_config=cfg, streamer=Streamer())
    clock.emit({})


if __name__ == "__main__":
    main()
