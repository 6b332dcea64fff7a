"""Triton deployment: the generated model repository and the Python-backend model vs HF `generate`.

The config.pbtxt is parsed with Triton's own ModelConfig protobuf (tritonclient), so a field Triton would
reject fails here. The model runs through its real entry point (the repository's 1/model.py shim) with a
stand-in of `triton_python_backend_utils` (tests/triton_stub; the real module exists only inside
tritonserver's Python backend: tests/test_triton_server.py runs the same repository in a real tritonserver),
in-process and fast: streamed and whole responses must carry
exactly HF's greedy tokens (32 new tokens, EOS ignored), for an image sent as bytes and a text-only prompt
batched together, and a corrupt image fails only its own request with the one-line message trt-run prints.
Decoupled, requests join the running batch as they arrive: a short one sent while a long one streams ends first.
"""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from media_bombs import BOMB_MESSAGE, png_bomb
from test_generate import N_NEW, artifacts, hf_generate, media, processor  # noqa: F401 (fixtures)

STUB = Path(__file__).parent / "triton_stub"


@pytest.fixture(scope="module")
def repo(artifacts, tmp_path_factory):  # noqa: F811
    from qwen_vl_trt.runtime.serve.triton_repo import write_model_repository

    out = tmp_path_factory.mktemp("triton_repo")
    write_model_repository(artifacts, out, decoupled=True)
    write_model_repository(artifacts, out, name="qwen_vl_whole", decoupled=False)
    write_model_repository(artifacts, out, name="qwen_vl_no_reuse", caches={"prefix_cache_mb": 0,
                                                                             "encoder_cache_mb": 0})
    return out


def model_config(repo: Path, name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.fixture
def load_model(repo, monkeypatch):
    """Instantiate TritonPythonModel the way the Python backend does: import 1/model.py, initialize(args)."""
    monkeypatch.syspath_prepend(str(STUB))
    import qwen_vl_trt.runtime.serve.triton_model as tm

    importlib.reload(tm)  # binds the stand-in pb_utils

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"triton_{name}", repo / name / "1" / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        cfg = json_format.MessageToJson(model_config(repo, name), preserving_proto_field_name=True)
        model.initialize({"model_config": cfg, "model_instance_kind": "CPU", "model_repository": str(repo)})
        return model

    return load


def request(prompt: str, images=(), **params):
    import triton_python_backend_utils as pb

    inputs = {"prompt": np.array([prompt.encode()], dtype=object), "max_new_tokens": np.array([N_NEW], np.int32),
              "temperature": np.array([0.0], np.float32), "ignore_eos": np.array([True])}
    if images:
        inputs["images"] = np.array([Path(p).read_bytes() if isinstance(p, Path) else p for p in images], dtype=object)
    inputs.update(params)
    return pb.FakeRequest(**inputs)


def wait_final(req, timeout: float = 120) -> list:
    """Decoupled: `execute` returns at once and the engine's thread sends the responses (in-flight batching,
    issue 13); wait for the one flagged final -> all sent (response, flags)."""
    deadline = time.monotonic() + timeout
    while not (req.sender.sent and req.sender.sent[-1][1] & 1):
        assert time.monotonic() < deadline, "no final response"
        time.sleep(0.01)
    return req.sender.sent


def test_config_pbtxt_is_a_valid_triton_model_config(repo, artifacts):  # noqa: F811
    from qwen_vl_trt.model.manifest import load_manifest

    cfg = model_config(repo, "qwen_vl")
    assert cfg.backend == "python" and cfg.name == "qwen_vl"
    assert cfg.max_batch_size == load_manifest(artifacts).limits.max_batch == 2
    assert cfg.model_transaction_policy.decoupled and not model_config(repo, "qwen_vl_whole").model_transaction_policy.decoupled
    inputs = {i.name: (model_config_pb2.DataType.Name(i.data_type), list(i.dims), i.optional) for i in cfg.input}
    assert inputs["prompt"] == ("TYPE_STRING", [1], False)
    assert inputs["images"] == ("TYPE_STRING", [-1], True)
    assert {o.name: model_config_pb2.DataType.Name(o.data_type) for o in cfg.output} == \
        {"text": "TYPE_STRING", "token_ids": "TYPE_INT64"}
    assert Path(cfg.parameters["artifacts_dir"].string_value) == Path(artifacts).resolve()


def test_streamed_tokens_match_hf(load_model, media, hf_qwen3_vl, processor):  # noqa: F811
    model = load_model("qwen_vl")
    img = media["images"][0]
    req = request("Describe this image.", [img])
    assert model.execute([req]) is None  # decoupled: everything goes through the sender
    sent = wait_final(req)
    assert [flags for _, flags in sent] == [0] * N_NEW + [1]  # one response per token, then the final one
    tokens = [int(t) for r, _ in sent for t in r.tensor("token_ids").reshape(-1)]
    assert tokens == hf_generate(hf_qwen3_vl, processor, "Describe this image.", [img])
    text = "".join(r.tensor("text")[0, 0].decode() for r, _ in sent)
    assert text == model.pre.tokenizer.decode(tokens)


def test_batched_requests_match_hf_and_a_bad_image_fails_alone(load_model, media, hf_qwen3_vl, processor):  # noqa: F811
    import triton_python_backend_utils as pb

    model = load_model("qwen_vl_whole")
    img = media["images"][1]
    reqs = [request("What is shown?", [img]), request("Write a haiku about the sea."),
            request("Describe this image.", [b"\x89PNG\r\n\x1a\n not really a png"])]
    responses = model.execute(reqs)
    assert len(responses) == 3
    assert [int(t) for t in responses[0].tensor("token_ids").reshape(-1)] == \
        hf_generate(hf_qwen3_vl, processor, "What is shown?", [img])
    assert [int(t) for t in responses[1].tensor("token_ids").reshape(-1)] == \
        hf_generate(hf_qwen3_vl, processor, "Write a haiku about the sea.")
    assert responses[2].has_error() and responses[2].error.code() == pb.TritonError.INVALID_ARG
    assert responses[2].error.message().startswith("cannot read image <image 0>: not a supported image format")


def test_an_image_bomb_is_refused_from_its_header(load_model):
    """A 9000x9000 PNG (236 KB, 243 MB decoded) fails its request within a second, before decoding (issue 14)."""
    model, bomb = load_model("qwen_vl_whole"), png_bomb(9000, 9000)
    t0 = time.monotonic()
    responses = model.execute([request("Describe this image.", [bomb])])
    assert time.monotonic() - t0 < 1.0
    assert responses[0].has_error() and responses[0].error.message() == BOMB_MESSAGE.format(name="<image 0>")


def test_repository_cli_refuses_a_directory_without_artifacts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.serve.triton_repo", str(tmp_path / "none"),
                        str(tmp_path / "repo")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr


def test_repository_cli_refuses_an_execution_env_without_activate(artifacts, tmp_path):  # noqa: F811
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.serve.triton_repo", str(artifacts), str(tmp_path / "repo"),
                        "--execution-env", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: --execution-env {tmp_path}: no bin/activate there; pass a venv or conda env directory"


def test_decoupled_request_joins_the_running_batch(load_model, media, hf_qwen3_vl, processor):  # noqa: F811
    """A second `execute` while the first request still streams: its request joins the batch at the next step and
    ends first; both carry HF's tokens (the long one's first N_NEW)."""
    model = load_model("qwen_vl")
    img = media["images"][0]
    long_req = request("Write a haiku about the sea.", max_new_tokens=np.array([600], np.int32))
    short_req = request("Describe this image.", [img])
    assert model.execute([long_req]) is None
    while not long_req.sender.sent:
        time.sleep(0.01)
    assert model.execute([short_req]) is None
    short = wait_final(short_req)
    assert not (long_req.sender.sent[-1][1] & 1)  # the long one still runs
    ids = lambda sent: [int(t) for r, _ in sent for t in r.tensor("token_ids").reshape(-1)]  # noqa: E731
    assert ids(short) == hf_generate(hf_qwen3_vl, processor, "Describe this image.", [img])
    long = wait_final(long_req)
    assert len(ids(long)) == 600
    assert ids(long)[:N_NEW] == hf_generate(hf_qwen3_vl, processor, "Write a haiku about the sea.")


def test_cancelled_request_frees_its_slot(load_model):
    """`request.is_cancelled()` (the client cancelled): seen at its next token, the engine retires it, sends a
    CANCELLED final response and the slot is free."""
    import triton_python_backend_utils as pb

    model = load_model("qwen_vl")
    req = request("Write a haiku about the sea.", max_new_tokens=np.array([900], np.int32))
    assert model.execute([req]) is None
    while len(req.sender.sent) < 3:
        time.sleep(0.01)
    req.cancelled = True
    sent = wait_final(req)
    assert len(sent) < 900 and sent[-1][1] == 1
    assert sent[-1][0].has_error() and sent[-1][0].error.code() == pb.TritonError.CANCELLED  # issue 15's code
    engine = model.worker.engine
    deadline = time.monotonic() + 30
    while any(s is not None for s in engine.slots):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_reuse_caches_on_by_default_and_off_by_parameter(repo, load_model):
    """config.pbtxt without cache parameters: the engine's caches are on (runtime/scheduler.py defaults, with the
    default decoder.ort.onnx too); `prefix_cache_mb` / `encoder_cache_mb` "0" (qwen-vl-triton-repo --no-prefix-cache
    --encoder-cache-mb 0) turn them off."""
    from qwen_vl_trt.runtime.scheduler import DEFAULT_ENCODER_CACHE_MB, DEFAULT_PREFIX_CACHE_MB

    params = model_config(repo, "qwen_vl_no_reuse").parameters
    assert params["prefix_cache_mb"].string_value == "0" and params["encoder_cache_mb"].string_value == "0"
    assert "prefix_cache_mb" not in model_config(repo, "qwen_vl").parameters
    on, off = load_model("qwen_vl"), load_model("qwen_vl_no_reuse")
    try:  # the default ONNX Runtime graphs (decoder.ort.onnx) continue a slot's rows in chunks
        assert on.worker.engine.prefix_cache.budget == DEFAULT_PREFIX_CACHE_MB << 20
        assert on.worker.engine.continuation == "chunks"
        assert on.worker.engine.encoder_cache.budget == DEFAULT_ENCODER_CACHE_MB << 20
        assert off.worker.engine.prefix_cache is None and off.worker.engine.encoder_cache is None
    finally:
        on.finalize()
        off.finalize()


def test_triton_repo_cache_flags(artifacts, tmp_path):  # noqa: F811
    from qwen_vl_trt.runtime.serve.triton_repo import main

    assert main([str(artifacts), str(tmp_path), "--no-prefix-cache", "--encoder-cache-mb", "64"]) == 0
    params = model_config(tmp_path, "qwen_vl").parameters
    assert params["prefix_cache_mb"].string_value == "0" and params["encoder_cache_mb"].string_value == "64"
    assert main([str(artifacts), str(tmp_path), "--encoder-cache-mb", "-2"]) == 2


def test_custom_metrics_count_what_was_sent(load_model, media, processor):  # noqa: F811
    """The server's /metrics figures as Triton custom metrics (runtime/serve/triton_metrics.py): after one
    streamed image request and one bad request, the prompt-token counter holds HF's processor's prompt length,
    the generation counter N_NEW, one success (`length`) and one `invalid_request` failure; one time-to-first-token
    and one end-to-end observation, N_NEW - 1 inter-token ones; nothing running afterwards."""
    import triton_python_backend_utils as pb
    from PIL import Image

    model = load_model("qwen_vl")
    img = media["images"][0]
    req, bad = request("Describe this image.", [img]), request("hi", max_new_tokens=np.array([0], np.int32))
    assert model.execute([req, bad]) is None
    wait_final(req)
    wait_final(bad)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n_prompt = processor(text=[text], images=[Image.open(img).convert("RGB")], return_tensors="pt")["input_ids"].shape[1]

    def metric(name: str, **labels):
        family = pb.MetricFamily.registry["qwen_vl_" + name]
        found = [m for m in family.metrics if all(m.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1 and found[0].labels["model"] == "qwen_vl", (name, labels)
        return found[0]

    assert metric("prompt_tokens_total").value() == n_prompt
    assert metric("generation_tokens_total").value() == N_NEW
    assert metric("request_success_total", finished_reason="length").value() == 1
    assert metric("request_failure_total", reason="invalid_request").value() == 1
    assert len(metric("time_to_first_token_seconds").observed) == len(metric("e2e_request_latency_seconds").observed) == 1
    assert len(metric("inter_token_latency_seconds").observed) == N_NEW - 1
    assert metric("num_requests_running").value() == metric("num_requests_waiting").value() == 0
    assert metric("kv_cache_usage_perc").value() == 0
    model.finalize()


def test_cache_metrics_follow_the_engine(load_model, media):  # noqa: F811
    """The reuse caches' Triton metrics (runtime/serve/triton_metrics.py): the same image request twice, then
    another image under a budget that holds one sequence. The second request looked its S prompt tokens up and
    reused S - 1 (all but the last: runtime/prefix_cache.py), its image came from the encoder cache; the third
    evicted an entry. Every counter and gauge equals the engine's own count after each request."""
    import triton_python_backend_utils as pb

    model = load_model("qwen_vl")
    engine = model.worker.engine

    def value(name: str) -> float:
        (metric,) = pb.MetricFamily.registry["qwen_vl_" + name].metrics
        assert metric.labels["model"] == "qwen_vl"
        return metric.value()

    def send(images) -> dict:
        req = request("Describe this image.", images)
        assert model.execute([req]) is None
        wait_final(req)
        stats = engine.cache_stats()
        for name in ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_evictions", "encoder_cache_hits",
                     "encoder_cache_misses", "encoder_cache_evictions"):
            assert value(name + "_total") == stats[name], name
        assert value("prefix_cache_bytes") == stats["prefix_cache_bytes"] > 0
        assert value("encoder_cache_bytes") == stats["encoder_cache_bytes"] > 0
        return stats

    img0, img1 = media["images"][:2]
    first = send([img0])
    n_prompt = first["prefix_cache_queries"]
    assert first["prefix_cache_hits"] == 0 and first["encoder_cache_misses"] == 1
    second = send([img0])
    assert second["prefix_cache_queries"] == 2 * n_prompt and second["prefix_cache_hits"] == n_prompt - 1
    assert second["encoder_cache_hits"] == 1 and second["encoder_cache_misses"] == 1
    engine.prefix_cache.budget = int(1.5 * second["prefix_cache_bytes"])  # one finished sequence, not two
    third = send([img1])
    assert third["prefix_cache_evictions"] >= 1 and third["prefix_cache_bytes"] <= engine.prefix_cache.budget
    model.finalize()


def test_parser_floods_fail_their_request(load_model):
    """Issue 21: the Triton model decodes through the same guard (runtime/media_guard.py). A JPEG of 3 million
    empty APP1 segments (refused from its structure) and a GIF of 3 million empty comments (stopped at its CPU
    budget) each fail their request with INVALID_ARG within 2 s (a loaded 2-core machine: ~0.1 and ~1.1 s here)."""
    import media_bombs
    import triton_python_backend_utils as pb

    model = load_model("qwen_vl_whole")
    for flood, message in [
            (media_bombs.jpeg_app1_flood(3_000_000), "image <image 0> is a JPEG with more than 1000 marker segments "
             "before its image data (encoders write under 30); re-encode it"),
            (media_bombs.gif_comment_flood(3_000_000), "image <image 0> did not decode within its limit (0.5 s of CPU "
             "time, 1.0 s in all, for reading its header); re-encode it as a plain PNG or JPEG")]:
        t0 = time.monotonic()
        (response,) = model.execute([request("Describe this image.", [flood])])
        assert time.monotonic() - t0 < 2.0
        assert response.has_error() and response.error.code() == pb.TritonError.INVALID_ARG
        assert response.error.message() == message
