"""The model repository served by a real tritonserver (2.51.0, nvidia-pytriton's wheel: tests/real_tritonserver.py).

`qwen-vl-triton-repo` writes the repository for the test artifacts (decoupled `qwen_vl`, whole-response
`qwen_vl_whole`), the server starts once for this file on free loopback ports, and clients talk to it with
tritonclient, as users do: gRPC streaming (decoupled) and HTTP / gRPC (non-decoupled). Greedy tokens must equal
HF `generate` (32 new tokens, EOS ignored; tests/test_generate.py's reference) and the text `trt-run`'s; bad
requests get INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) for themselves alone while requests sent with them
succeed; a client cancelling a stream stops its generation; 16 clients x 10 requests finish without a failure
and without the server's memory growing; the reuse caches' custom metrics on Triton's metrics endpoint count a
repeated request's hits; the server exits 0 at the end.
"""
from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tolerances import TRITON_RSS_GROWTH_MIB

import real_tritonserver as tritonserver
from test_generate import N_NEW, artifacts, hf_generate, media, processor, run_json  # noqa: F401 (fixtures)

STREAM_TIMEOUT_S = 120  # one response of a stream; generous for a loaded 2-core host
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n not really a png"
LONG_NEW = 600  # > max_seq 512 - a long prompt leaves no room in the 1024-row cache of the test artifacts
WAIT_US = 3_000_000  # qwen_vl_wait's batcher waits up to 3 s for a second request: two sent at once share a batch


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):  # noqa: F811  (module scope: `artifacts` is a module fixture)
    repo = tmp_path_factory.mktemp("triton_repo")
    for extra in ([], ["--name", "qwen_vl_whole", "--no-streaming"],
                  ["--name", "qwen_vl_wait", "--no-streaming", "--max-queue-delay-us", str(WAIT_US)]):
        subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.serve.triton_repo", str(artifacts), str(repo),
                        "--execution-env", str(tritonserver.TRITON_ENV), *extra], check=True, timeout=60)
    srv = tritonserver.start(repo, tmp_path_factory.mktemp("tritonserver"), metrics=True)
    yield srv
    assert srv.stop() == 0, srv.log_text()[-4000:]
    assert "Stub process 'qwen_vl_0_0' is not healthy" not in srv.log_text()


@pytest.fixture(scope="module")
def refs(artifacts, media, hf_qwen3_vl, processor):  # noqa: F811
    """(prompt, images, system) cases -> (HF's greedy tokens, trt-run's text)."""
    img0, img1 = media["images"]
    cases = {"image": ("Describe this image.", (img0,), None), "text": ("Write a haiku about the sea.", (), None),
             "two": ("Compare them.", (img0, img1), "You are terse.")}
    out = {}
    for name, (prompt, images, system) in cases.items():
        args = [a for p in images for a in ("--image", str(p))] + ["--prompt", prompt] + \
            (["--system", system] if system else [])
        out[name] = (cases[name], hf_generate(hf_qwen3_vl, processor, prompt, images, system=system),
                     run_json(artifacts, *args)["text"])
    return out


def inputs(mod, prompt="Describe this image.", images=(), system=None, max_new=N_NEW, drop=(), **override):
    """InferInputs of one request (batch dim 1): greedy, EOS ignored; `override` name=(array, datatype)."""
    tensors = {"prompt": (np.array([[prompt if isinstance(prompt, bytes) else prompt.encode()]], object), "BYTES"),
               "max_new_tokens": (np.array([[max_new]], np.int32), "INT32"),
               "temperature": (np.array([[0.0]], np.float32), "FP32"), "ignore_eos": (np.array([[True]]), "BOOL")}
    if images:
        tensors["images"] = (np.array([[p if isinstance(p, bytes) else p.read_bytes() for p in images]], object),
                             "BYTES")
    if system:
        tensors["system"] = (np.array([[system.encode()]], object), "BYTES")
    tensors.update(override)
    out = []
    for name, (array, dtype) in tensors.items():
        if name not in drop:
            t = mod.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            out.append(t)
    return out


def stream(server, request_inputs, cancel_after: int | None = None):
    """One request over its own gRPC stream to the decoupled model -> (token ids, text, error message or None).
    With `cancel_after`, the client cancels the stream once that many tokens have arrived."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    tokens, text, error = [], "", None
    try:
        client.async_stream_infer("qwen_vl", request_inputs, enable_empty_final_response=True)
        while True:
            result, err = responses.get(timeout=STREAM_TIMEOUT_S)
            if err is not None:
                error = err.message()
                break
            ids, piece = result.as_numpy("token_ids"), result.as_numpy("text")  # None in an empty final response
            tokens += [] if ids is None else ids.reshape(-1).tolist()
            text += "" if piece is None else b"".join(piece.reshape(-1)).decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            if cancel_after is not None and len(tokens) >= cancel_after:
                break
    finally:
        client.stop_stream(cancel_requests=cancel_after is not None)
        client.close()
    return tokens, text, error


def http_infer(server, request_inputs, model="qwen_vl_whole"):
    """One request to a non-decoupled model over HTTP -> (token ids, text) or the InferenceServerException."""
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=STREAM_TIMEOUT_S)
    try:
        r = client.infer(model, request_inputs)
        return r.as_numpy("token_ids").reshape(-1).tolist(), r.as_numpy("text").reshape(-1)[0].decode()
    except InferenceServerException as e:
        return e
    finally:
        client.close()


def in_parallel(*calls):
    """Run the zero-argument callables at the same time (so Triton can batch them); their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def case_inputs(mod, refs, name):
    (prompt, images, system), _, _ = refs[name]
    return inputs(mod, prompt, images, system)


def test_backend_stubs_run_numpy_1_from_the_execution_env(server):
    """Each model's stub process (3 models) maps numpy 1.x's core library from .venv/triton (numpy 2 breaks
    Triton 2.51's bytes tensors), not the project venv's numpy 2 (numpy/_core/)."""
    import psutil

    children = psutil.Process(server.process.pid).children(recursive=True)
    stubs = [p for p in children if p.cmdline()[:1] and p.cmdline()[0].endswith("triton_python_backend_stub")]
    assert len(stubs) == 3
    for stub in stubs:
        cores = {m.path for m in stub.memory_maps() if "_multiarray_umath" in m.path}
        assert cores and all(c.startswith(str(tritonserver.TRITON_ENV)) and "/numpy/core/" in c for c in cores), cores


def test_grpc_streamed_tokens_match_hf(server, refs):
    for name, (_, hf_tokens, cli_text) in refs.items():
        tokens, text, error = stream(server, case_inputs(grpcclient, refs, name))
        assert error is None
        assert tokens == hf_tokens, name
        assert text == cli_text, name


def test_http_batched_whole_responses_match_hf(server, refs):
    names = list(refs)
    results = in_parallel(*[lambda n=n: http_infer(server, case_inputs(httpclient, refs, n)) for n in names])
    for name, result in zip(names, results):
        assert result == (refs[name][1], refs[name][2]), name


def test_bad_requests_get_invalid_arg_alone(server, refs):
    """Sent at once with a good request: each bad one gets its own HTTP 400 (INVALID_ARG), the good one its tokens."""
    bad = {"corrupt image": inputs(httpclient, images=[CORRUPT_PNG]),
           "over-long": inputs(httpclient, " ".join(["sea"] * 600)),
           "wrong dtype": inputs(httpclient, max_new_tokens=(np.array([[8.0]], np.float32), "FP32")),
           "missing prompt": inputs(httpclient, images=[refs["image"][0][1][0]], drop=("prompt",)),
           "not utf-8": inputs(httpclient, b"\xff\xfe caf\xe9")}
    expected = {"corrupt image": r"cannot read image <image 0>: not a supported image format",
                "over-long": r"prompt has \d+ tokens, artifacts allow at most 512",
                "wrong dtype": r"input 'max_new_tokens' data-type is 'FP32', but model 'qwen_vl_whole' expects 'INT32'",
                "missing prompt": r"missing input 'prompt' \(TYPE_STRING \[1\]\)",
                "not utf-8": r"input 'prompt' is not UTF-8 text"}
    results = in_parallel(lambda: http_infer(server, case_inputs(httpclient, refs, "image")),
                          *[lambda r=r: http_infer(server, r) for r in bad.values()])
    assert results[0] == (refs["image"][1], refs["image"][2])
    for (name, pattern), error in zip(expected.items(), results[1:]):
        assert isinstance(error, InferenceServerException), name
        assert error.status() == "400", (name, error.status(), error.message())  # INVALID_ARG
        assert re.search(pattern, error.message()), (name, error.message())


def test_an_over_long_request_fails_alone_in_its_batch(server, artifacts):  # noqa: F811
    """Prompt + max_new_tokens beyond the cache, batched (Triton's statistics show one execution of 2) with a
    request of the same settings: only it fails; the whole batch once failed on its longest prompt."""
    haiku, long_prompt = "Write a haiku about the sea.", " ".join(["sea"] * 450)  # ~460 tokens: fits max_seq 512
    stats = httpclient.InferenceServerClient(server.http_url)
    ok, too_long = in_parallel(lambda: http_infer(server, inputs(httpclient, haiku, max_new=LONG_NEW), "qwen_vl_wait"),
                               lambda: http_infer(server, inputs(httpclient, long_prompt, max_new=LONG_NEW),
                                                  "qwen_vl_wait"))
    batches = stats.get_inference_statistics("qwen_vl_wait")["model_stats"][0]["batch_stats"]
    stats.close()
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in batches] == [(2, 1)]
    reference = run_json(artifacts, "--prompt", haiku, "--max-new-tokens", str(LONG_NEW))
    assert ok == (reference["token_ids"], reference["text"])
    assert isinstance(too_long, InferenceServerException) and too_long.status() == "400"
    assert re.search(rf"prompt has \d+ tokens and --max-new-tokens is {LONG_NEW}: together they exceed the 1024-token",
                     too_long.message()), too_long.message()


def test_bad_requests_over_grpc(server, refs):
    """gRPC unary (non-decoupled): INVALID_ARGUMENT; gRPC stream: the request's error, a neighbour unharmed."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as e:
        client.infer("qwen_vl_whole", inputs(grpcclient, images=[CORRUPT_PNG]))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "cannot read image" in e.value.message()
    client.close()
    streamed_bad, streamed_good = in_parallel(lambda: stream(server, inputs(grpcclient, images=[CORRUPT_PNG])),
                                              lambda: stream(server, case_inputs(grpcclient, refs, "text")))
    assert streamed_bad[0] == [] and "cannot read image <image 0>" in streamed_bad[2]
    assert streamed_good == (refs["text"][1], refs["text"][2], None)


def test_client_cancelling_mid_stream_stops_its_generation(server, refs):
    max_new = 500
    tokens, _, error = stream(server, inputs(grpcclient, "Write a haiku about the sea.", max_new=max_new),
                              cancel_after=4)
    assert error is None and 4 <= len(tokens) < max_new
    deadline, stopped = time.monotonic() + 30, None
    while stopped is None and time.monotonic() < deadline:
        stopped = re.search(r"request cancelled after (\d+) tokens", server.log_text())
        time.sleep(0.1)
    assert stopped is not None and int(stopped.group(1)) < max_new, server.log_text()[-3000:]
    assert stream(server, case_inputs(grpcclient, refs, "image")) == (refs["image"][1], refs["image"][2], None)


def cache_metrics(server, model: str) -> dict:
    """The qwen_vl_*cache* samples of `model` on Triton's metrics endpoint (Prometheus text, parsed by
    prometheus_client) -> name -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.metrics_url, timeout=30) as r:
        text = r.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if "cache" in sample.name and sample.name.startswith("qwen_vl_")
            and sample.labels.get("model") == model}


def test_cache_metrics_count_a_repeated_request(server, refs):
    """The same image request twice to qwen_vl_whole (HF's tokens both times): the second looked up as many
    prompt tokens as the first and reused all but the last one's KV rows (runtime/prefix_cache.py), its image
    came from the encoder cache; the caches hold bytes. Read from Triton's own metrics endpoint
    (runtime/serve/triton_metrics.py)."""
    before = cache_metrics(server, "qwen_vl_whole")
    assert http_infer(server, case_inputs(httpclient, refs, "image")) == (refs["image"][1], refs["image"][2])
    first = cache_metrics(server, "qwen_vl_whole")
    assert http_infer(server, case_inputs(httpclient, refs, "image")) == (refs["image"][1], refs["image"][2])
    second = cache_metrics(server, "qwen_vl_whole")
    grew = lambda a, b, name: b[f"qwen_vl_{name}"] - a[f"qwen_vl_{name}"]  # noqa: E731
    n_prompt = grew(before, first, "prefix_cache_queries_total")
    assert n_prompt > 0 and grew(first, second, "prefix_cache_queries_total") == n_prompt
    assert grew(first, second, "prefix_cache_hits_total") == n_prompt - 1
    assert grew(first, second, "encoder_cache_hits_total") == 1
    assert grew(first, second, "encoder_cache_misses_total") == 0
    assert grew(first, second, "prefix_cache_evictions_total") == 0  # 1 GiB default budget
    assert second["qwen_vl_prefix_cache_bytes"] > 0 and second["qwen_vl_encoder_cache_bytes"] > 0


def test_16_clients_x_10_requests_no_failure_and_flat_memory(server, refs):
    """Half the clients stream over gRPC, half use HTTP; every answer must equal its reference. Memory is
    compared between the end of the 2nd and of the 10th round (the 1st warms allocator pools and caches)."""
    names, rounds, clients = list(refs), 10, 16
    rss_after: dict = {}
    barrier = threading.Barrier(clients, action=lambda: rss_after.setdefault(len(rss_after),
                                                                              tritonserver.rss_bytes(server)))

    def client(c: int) -> list:
        failures = []
        for r in range(rounds):
            name = names[(c + r) % len(names)]
            want = (refs[name][1], refs[name][2])
            got = (stream(server, case_inputs(grpcclient, refs, name))[:2] if c % 2 else
                   http_infer(server, case_inputs(httpclient, refs, name)))
            if got != want:
                failures.append((c, r, name, got))
            barrier.wait(timeout=STREAM_TIMEOUT_S)
        return failures

    failures = [f for fs in in_parallel(*[lambda c=c: client(c) for c in range(clients)]) for f in fs]
    assert failures == []
    growth = rss_after[rounds - 1] - rss_after[1]
    assert growth < TRITON_RSS_GROWTH_MIB * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 8 rounds: {rss_after}"
