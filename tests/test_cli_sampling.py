"""`trt-run` with the structured-output and logprobs flags (`--json-schema`, `--regex`, `--logprobs`, `--min-tokens`).

Artifacts: test_generate.py's tiny Qwen3-VL (fp32, ONNX Runtime, max batch 2). References: `jsonschema` and
`re.fullmatch` for the constrained texts (one prompt: `generate`; three prompts: the in-flight engine, one matcher
per prompt); HF `generate(output_logits=True)` through torch's `log_softmax` for `--logprobs` (tolerance
2 x FP32_ATOL, as tests/test_server_sampling.py says why); bad flags: one `error:` line, exit 2.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

from test_generate import N_NEW, artifacts, processor, run_json  # noqa: F401 (fixtures)
from test_server_sampling import SCHEMA, hf_run
from tolerances import FP32_ATOL

PROMPT = "Write a haiku about the sea."


def sampled() -> list[str]:
    """Flags of a seeded sampled run that ends at EOS (the grammar's end)."""
    return ["--temperature", "0.8", "--seed", "2", "--max-new-tokens", "120"]


def test_json_schema_file_one_prompt_and_in_flight(artifacts, tmp_path):  # noqa: F811
    from qwen_vl_trt.runtime.serve import cli

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(SCHEMA))
    args = cli.parser().parse_args(["--model-dir", str(artifacts), "--json", "--backend", "onnxruntime",
                                    "--json-schema", str(schema), *sampled()])
    for prompts in (["A person, as JSON."], ["A person.", "Another one.", "A third."]):
        args.prompt = prompts
        buf = io.StringIO()
        cli.run(cli.RunConfig.from_args(args), out=buf, err=io.StringIO())
        out = json.loads(buf.getvalue())
        texts = [out["text"]] if len(prompts) == 1 else out["text"]
        assert len(texts) == len(prompts)
        for text in texts:
            jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_flag(artifacts):  # noqa: F811
    from qwen_vl_trt.runtime.serve import cli

    pattern = r"[A-Z][a-z]{2,6} [0-9]{1,3}"
    args = cli.parser().parse_args(["--model-dir", str(artifacts), "--json", "--backend", "onnxruntime",
                                    "--prompt", PROMPT, "--regex", pattern, *sampled()])
    buf = io.StringIO()
    cli.run(cli.RunConfig.from_args(args), out=buf, err=io.StringIO())
    assert re.fullmatch(pattern, json.loads(buf.getvalue())["text"])


def test_logprobs_flag_matches_hf(artifacts, hf_qwen3_vl, processor):  # noqa: F811
    import torch

    tokens, logits = hf_run(hf_qwen3_vl, processor, [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}])
    out = run_json(artifacts, "--prompt", PROMPT, "--logprobs", "3")
    assert out["token_ids"] == tokens and len(out["logprobs"]) == N_NEW
    for entry, token, step in zip(out["logprobs"], tokens, logits):
        ref = torch.log_softmax(step, dim=-1).numpy()
        top = np.argsort(-ref)[:3]
        assert entry["token_id"] == token and entry["logprob"] == pytest.approx(float(ref[token]), abs=2 * FP32_ATOL)
        assert [t for t, _ in entry["top"]] == top.tolist()
        np.testing.assert_allclose([lp for _, lp in entry["top"]], ref[top], atol=2 * FP32_ATOL)


@pytest.mark.parametrize("flags,message", [
    (["--json-schema", "/nonexistent/schema.json"], "error: --json-schema /nonexistent/schema.json: No such file or "
                                                    "directory"),
    (["--regex", "[a-"], "error: invalid grammar: at 1(8): invalid regex \"[a-\""),
    (["--regex", "a+", "--json-schema", "x.json"], "error: --json-schema and --regex: give one of them"),
    (["--logprobs", "21"], "error: --logprobs 21: must be in [0, 20]"),
    (["--min-p", "2"], "error: --min-p 2.0: must be in [0, 1]"),
    (["--min-tokens", "50", "--max-new-tokens", "10"], "error: --min-tokens 50: must be <= max_new_tokens (10)"),
])
def test_bad_flags_are_one_line(artifacts, flags, message):  # noqa: F811
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.serve.cli", "--model-dir", str(artifacts),
                        "--prompt", "hi", "--backend", "onnxruntime", *flags], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith(message)
