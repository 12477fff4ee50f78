"""Measuring models with ONNX Runtime: static figures, interleaved latency (agreement and accuracy: see agreement)."""

from __future__ import annotations

import gzip
import logging
import os
import platform
import time
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnx_ops.agreement import accuracy, agreement
from onnx_ops.errors import InvalidModelError, PassFailedError, ResourceLimitError
from onnx_ops.report import Latency, ModelStats
from onnx_ops.validate import clean_message, iter_tensors

__all__ = [
    "Runner",
    "accuracy",
    "agreement",
    "cpu_name",
    "measure_latency",
    "model_stats",
]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
# How ONNX Runtime words running out of memory (an address-space limit also makes thread creation fail).
_OOM_MARKERS = ("Failed to allocate memory", "bad_alloc", "out of memory", "Cannot allocate memory")


def _is_out_of_memory(e: BaseException, message: str) -> bool:
    return isinstance(e, MemoryError) or any(m in message for m in _OOM_MARKERS)


def model_stats(model: onnx.ModelProto) -> ModelStats:
    """Size on disk, gzip size, parameters, zero fraction and op histogram of a model."""
    data = model.SerializeToString()
    params = zeros = 0
    for _, tensor in iter_tensors(model):
        if tensor.data_type == onnx.TensorProto.STRING:
            continue
        array = numpy_helper.to_array(tensor)
        params += array.size
        zeros += int(array.size - np.count_nonzero(array))
    ops: Counter[str] = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node
    )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelStats(
        size_bytes=len(data),
        gzip_bytes=len(gzip.compress(data, compresslevel=6)),
        parameters=params,
        zero_fraction=zeros / params if params else 0.0,
        nodes=len(model.graph.node),
        op_counts=dict(sorted(ops.items())),
        opset=opset,
    )


class Runner:
    """An ONNX Runtime CPU session over one model, with errors turned into our exceptions."""

    def __init__(self, model: onnx.ModelProto | bytes, *, threads: int = 0, what: str = "model") -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        data = model if isinstance(model, bytes) else model.SerializeToString()
        self.what = what
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...), all plain Exceptions
            message = clean_message(e)
            if _is_out_of_memory(e, message):
                raise ResourceLimitError(
                    f"loading the {what} needs more memory than this process may use: {message}"
                ) from e
            error = InvalidModelError if what == "model" else PassFailedError
            raise error(f"ONNX Runtime cannot load the {what}: {message}") from e
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: Feed) -> list[object]:
        """Run once; a failure names the model and ONNX Runtime's reason."""
        try:
            return list(self.session.run(None, feed))
        except Exception as e:  # ORT raises its own exception types; every failure becomes a clear error
            message = clean_message(e)
            if _is_out_of_memory(e, message):
                raise ResourceLimitError(
                    f"running the {self.what} needs more memory than this process may use: {message}"
                ) from e
            error = InvalidModelError if self.what == "model" else PassFailedError
            raise error(f"ONNX Runtime cannot run the {self.what}: {message}") from e


def measure_latency(
    first: Runner, second: Runner, feed: Feed, *, runs: int, warmup: int, batch: int = 1
) -> tuple[Latency, Latency]:
    """Time both models on the same input, alternating which goes first, so host noise hits both alike."""
    for _ in range(warmup):
        first.session.run(None, feed)
        second.session.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(runs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            runner = (first, second)[which]
            start = time.perf_counter()
            runner.session.run(None, feed)
            times[which].append((time.perf_counter() - start) * 1000.0)
    return _latency(times[0], batch), _latency(times[1], batch)


def latency_ratio(first: Runner, second: Runner, feed: Feed, *, runs: int, warmup: int) -> float:
    """p50 latency of `second` over `first`, timed interleaved (1.0 when `first` is too fast to time)."""
    before, after = measure_latency(first, second, feed, runs=runs, warmup=warmup)
    return after.p50_ms / before.p50_ms if before.p50_ms > 0 else 1.0


def _latency(ms: list[float], batch: int) -> Latency:
    values = np.asarray(ms)
    mean = float(values.mean())
    return Latency(
        runs=len(ms),
        p50_ms=float(np.percentile(values, 50)),
        p90_ms=float(np.percentile(values, 90)),
        p99_ms=float(np.percentile(values, 99)),
        mean_ms=mean,
        throughput_per_s=1000.0 / mean * batch if mean > 0 else 0.0,
    )


def cpu_name() -> str:
    """The CPU model name of this host."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_threads() -> int:
    """The threads ONNX Runtime uses by default on this host (one per core)."""
    return os.cpu_count() or 1
