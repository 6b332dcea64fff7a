"""Stand-in for Triton's `triton_python_backend_utils` (only inside the Python backend's stub process).

It mirrors the parts of the real API that runtime/serve/triton_model.py uses, with the real names and semantics
(python_backend README, "Usage"): Tensor(name, numpy array) / as_numpy(), InferenceResponse(output_tensors,
error), TritonError(message, code) with the codes INTERNAL / INVALID_ARG / CANCELLED (python_backend README,
"Error Handling"), Logger.log_info / log_error, request.is_cancelled(), get_input_tensor_by_name(request, name) -> Tensor | None,
using_decoupled_model_transaction_policy(model_config), request.get_response_sender().send(response, flags),
TRITONSERVER_RESPONSE_COMPLETE_FINAL, and custom metrics (README "Custom Metrics"): MetricFamily(name,
description, kind) with kinds COUNTER / GAUGE / HISTOGRAM, family.Metric(labels, buckets=None), metric.increment(v)
/ set(v) / observe(v) / value(). Tests build requests with `FakeRequest` and read metrics from
`MetricFamily.registry` (name -> family).
"""
from __future__ import annotations

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonError(Exception):
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL):
        super().__init__(message)
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    registry: dict = {}

    def __init__(self, name: str, description: str, kind: str):
        assert kind in (self.COUNTER, self.GAUGE, self.HISTOGRAM) and description
        self.name, self.kind, self.metrics = name, kind, []
        MetricFamily.registry[name] = self

    def Metric(self, labels: dict, buckets=None) -> "Metric":  # noqa: N802 (the real API's name)
        assert (buckets is not None) == (self.kind == self.HISTOGRAM)
        metric = Metric(self.kind, dict(labels), buckets)
        self.metrics.append(metric)
        return metric


class Metric:
    def __init__(self, kind: str, labels: dict, buckets):
        self.kind, self.labels, self.buckets, self._value, self.observed = kind, labels, buckets, 0.0, []

    def increment(self, value: float) -> None:
        assert self.kind in (MetricFamily.COUNTER, MetricFamily.GAUGE) and (value >= 0 or self.kind == "gauge")
        self._value += value

    def set(self, value: float) -> None:
        assert self.kind == MetricFamily.GAUGE
        self._value = value

    def observe(self, value: float) -> None:
        assert self.kind == MetricFamily.HISTOGRAM
        self.observed.append(value)

    def value(self) -> float:
        return self._value


class Logger:
    lines: list[str] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.lines.append(message)

    log_warn = log_error = log_info


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None):
        self.output_tensors, self.error = list(output_tensors), error

    def has_error(self) -> bool:
        return self.error is not None

    def tensor(self, name: str) -> np.ndarray:
        return next(t.as_numpy() for t in self.output_tensors if t.name() == name)


class ResponseSender:
    def __init__(self):
        self.sent: list[tuple[InferenceResponse | None, int]] = []

    def send(self, response=None, flags: int = 0) -> None:
        if self.sent and self.sent[-1][1] & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            raise RuntimeError("response sent after the final flag")
        self.sent.append((response, flags))


class FakeRequest:
    """A request as Triton delivers it with max_batch_size > 0: every tensor has a leading batch dim of 1."""

    def __init__(self, **inputs):
        self.inputs = {k: Tensor(k, np.asarray(v)[None]) for k, v in inputs.items()}
        self.sender = ResponseSender()
        self.cancelled = False  # tests set it: the client cancelled the request

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.cancelled


def get_input_tensor_by_name(request: FakeRequest, name: str):
    return request.inputs.get(name)


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))
