"""`qwen-vl-triton-repo ARTIFACTS REPO`: a Triton Inference Server model repository for exported artifacts.

Writes REPO/<name>/config.pbtxt (Python backend, decoupled streaming by default, dynamic batching up to the
artifacts' max_batch, parameters `artifacts_dir`, `backend`, `prefix_cache_mb` and `encoder_cache_mb`: the
in-flight engine's reuse caches, on by default, runtime/serve/cache_flags.py) and REPO/<name>/1/model.py, a one-line shim
over runtime/serve/triton_model.py. Serve with `tritonserver --model-repository REPO` in a container that has
this package (and onnxruntime-gpu or TensorRT) installed; the request/response tensors are documented in
runtime/serve/triton_model.py. A missing or mismatched artifact directory is one `error:` line and exit 2.

`--execution-env DIR` writes the Python backend's EXECUTION_ENV_PATH parameter: the backend then starts its
stub process after `source DIR/bin/activate`, so the model runs in that Python environment (a venv works; the
python_backend README, "Creating Custom Execution Environments"). Triton 2.51's Python backend needs numpy<2
there (README.md, "Triton Inference Server").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen_vl_trt.model.errors import UserError

from . import cache_flags

# (name, data_type, dims, optional) of the request tensors; dims exclude the batch dim.
INPUTS = (
    ("prompt", "TYPE_STRING", [1], False),
    ("images", "TYPE_STRING", [-1], True),
    ("system", "TYPE_STRING", [1], True),
    ("max_new_tokens", "TYPE_INT32", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("top_k", "TYPE_INT32", [1], True),
    ("seed", "TYPE_INT64", [1], True),
    ("ignore_eos", "TYPE_BOOL", [1], True),
)
OUTPUTS = (("text", "TYPE_STRING", [1]), ("token_ids", "TYPE_INT64", [-1]))

MODEL_PY = '''"""Triton Python-backend entry point of qwen-vl-trt (written by runtime/serve/triton_repo.py)."""
from qwen_vl_trt.runtime.serve.triton_model import TritonPythonModel  # noqa: F401
'''


def config_pbtxt(name: str, artifacts: Path, max_batch: int, backend: str = "auto", decoupled: bool = True,
                 queue_delay_us: int = 2000, execution_env: Path | None = None, caches: dict | None = None) -> str:
    """The model's config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    def tensor(n, dtype, dims, optional=None):
        opt = "" if optional is None else f", optional: {str(optional).lower()}"
        return f'  {{ name: "{n}", data_type: {dtype}, dims: [ {", ".join(map(str, dims))} ]{opt} }}'

    inputs = ",\n".join(tensor(*t) for t in INPUTS)
    outputs = ",\n".join(tensor(*t) for t in OUTPUTS)
    env = ("" if execution_env is None else
           f'parameters {{ key: "EXECUTION_ENV_PATH", value: {{ string_value: "{Path(execution_env).resolve()}" }} }}\n')
    cache_params = "".join(f'parameters {{ key: "{k}", value: {{ string_value: "{v:g}" }} }}\n'
                           for k, v in (caches or {}).items())
    return f'''name: "{name}"
backend: "python"
max_batch_size: {max_batch}
model_transaction_policy {{ decoupled: {str(decoupled).lower()} }}
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
input [
{inputs}
]
output [
{outputs}
]
instance_group [ {{ count: 1, kind: KIND_MODEL }} ]
parameters {{ key: "artifacts_dir", value: {{ string_value: "{artifacts.resolve()}" }} }}
parameters {{ key: "backend", value: {{ string_value: "{backend}" }} }}
{cache_params}{env}'''


def write_model_repository(artifacts, repo, name: str = "qwen_vl", backend: str = "auto",
                           decoupled: bool = True, execution_env=None, queue_delay_us: int = 2000,
                           caches: dict | None = None) -> Path:
    """Check the artifacts (manifest), then write REPO/NAME/{config.pbtxt, 1/model.py}; returns the model dir."""
    from qwen_vl_trt.model.manifest import load_manifest

    manifest = load_manifest(artifacts)
    if execution_env is not None and not (Path(execution_env) / "bin" / "activate").is_file():
        raise UserError(f"--execution-env {execution_env}: no bin/activate there; pass a venv or conda env directory")
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(
        config_pbtxt(name, Path(artifacts), int(manifest.limits.max_batch), backend, decoupled,
                     queue_delay_us, execution_env, caches))
    (model_dir / "1" / "model.py").write_text(MODEL_PY)
    return model_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen-vl-triton-repo", description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", help="artifact directory from export_all.sh")
    ap.add_argument("repo", help="model repository directory to write")
    ap.add_argument("--name", default="qwen_vl")
    ap.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto")
    ap.add_argument("--no-streaming", action="store_true",
                    help="one response per request instead of decoupled token streaming")
    ap.add_argument("--execution-env", metavar="DIR",
                    help="Python environment (venv) the model runs in: the backend's EXECUTION_ENV_PATH")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000, metavar="US",
                    help="how long Triton's dynamic batcher waits to fill a batch (default 2000)")
    cache_flags.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.max_queue_delay_us < 0:
        print(f"error: --max-queue-delay-us {args.max_queue_delay_us}: must be >= 0", file=sys.stderr)
        return 2
    try:
        path = write_model_repository(args.artifacts, args.repo, args.name, args.backend, not args.no_streaming,
                                      args.execution_env, args.max_queue_delay_us, cache_flags.sizes(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}; serve with: tritonserver --model-repository {Path(args.repo).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
