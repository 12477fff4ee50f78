"""Measuring models with ONNX Runtime: static figures, interleaved latency (see timing), agreement, accuracy."""

from __future__ import annotations

import gzip
import logging
import math
import os
import platform
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnx_ops.errors import InvalidModelError, PassFailedError, ResourceLimitError
from onnx_ops.report import Accuracy, Latency, ModelStats, OutputAgreement
from onnx_ops.timing import Timed, TimingSettings, compare
from onnx_ops.validate import clean_message, iter_tensors

__all__ = [
    "Runner",
    "accuracy",
    "agreement",
    "compare_latency",
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
        self.threads = threads
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
    first: Runner, second: Runner, feed: Feed, *, runs: int, warmup: int, batch: int = 1, seconds: float = 0.0
) -> tuple[Latency, Latency]:
    """Both models' wall-clock figures from `compare_latency` (at least `runs` interleaved pairs)."""
    timed = compare_latency(first, second, feed, settings=TimingSettings(warmup, runs, seconds=seconds), batch=batch)
    return timed.baseline, timed.candidate


def compare_latency(
    baseline: Runner, candidate: Runner, feed: Feed, *, settings: TimingSettings | None = None, batch: int = 1
) -> Timed:
    """Time `candidate` against `baseline` in interleaved pairs; see `onnx_ops.timing.compare`.

    Both sessions should use the same thread count; the ratio is on the calling thread's CPU time when it is 1.
    """
    threads = baseline.threads if baseline.threads == candidate.threads else 0
    return compare(
        lambda: baseline.session.run(None, feed),
        lambda: candidate.session.run(None, feed),
        threads=threads,
        settings=settings,
        batch=batch,
    )


def agreement(names: Sequence[str], ref: Sequence[list[object]], new: Sequence[list[object]]) -> list[OutputAgreement]:
    """Per-output error metrics of `new` against `ref`, over all samples (lists of per-run outputs)."""
    result = []
    for index, name in enumerate(names):
        want = [_as_array(outputs[index]) for outputs in ref]
        got = [_as_array(outputs[index]) for outputs in new]
        if any(w is None for w in want) or any(g is None for g in got):
            logger.info("output %s is not a numeric tensor; no agreement measured", name)
            continue
        result.append(_compare(name, want, got))  # type: ignore[arg-type]
    return result


def _compare(name: str, want: list[np.ndarray], got: list[np.ndarray]) -> OutputAgreement:
    for w, g in zip(want, got, strict=True):
        if w.shape != g.shape:
            raise PassFailedError(f"output {name!r} changed shape from {list(w.shape)} to {list(g.shape)}")
    ref = np.concatenate([w.astype(np.float64).ravel() for w in want])
    out = np.concatenate([g.astype(np.float64).ravel() for g in got])
    if not np.isfinite(out).all():
        raise PassFailedError(f"the compressed model's output {name!r} holds NaN or infinite values")
    diff = np.abs(out - ref)
    noise = float(np.sum((out - ref) ** 2))
    signal = float(np.sum(ref**2))
    denom = float(np.linalg.norm(ref) * np.linalg.norm(out))
    cosine = float(np.dot(ref, out) / denom) if denom > 0 else (1.0 if noise == 0 else 0.0)
    return OutputAgreement(
        name=name,
        max_abs_err=float(diff.max()) if diff.size else 0.0,
        mean_abs_err=float(diff.mean()) if diff.size else 0.0,
        cosine=cosine,
        snr_db=math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf),
        top1_agreement=_top1(want, got),
    )


def _top1(want: list[np.ndarray], got: list[np.ndarray]) -> float | None:
    w = want[0]
    if w.dtype.kind == "f" and w.ndim >= 2 and w.shape[-1] > 1 and (w.ndim == 2 or _is_distribution(w)):
        # [batch, classes] scores, or per-position probabilities such as a CTC recognizer's [batch, T, chars].
        same = [np.argmax(a, axis=-1) == np.argmax(b, axis=-1) for a, b in zip(want, got, strict=True)]
        return float(np.concatenate([x.ravel() for x in same]).mean())
    if w.dtype.kind in "iu" and w.ndim == 1:  # class-label outputs (scikit-learn classifiers)
        return float(np.concatenate([a == b for a, b in zip(want, got, strict=True)]).mean())
    return None


def _is_distribution(x: np.ndarray) -> bool:
    """True when the last axis holds probabilities (non-negative, summing to 1): class scores, not features."""
    return bool(x.min() >= 0 and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3))


def accuracy(
    names: Sequence[str], labels: np.ndarray, ref: Sequence[list[object]], new: Sequence[list[object]]
) -> Accuracy | None:
    """Task accuracy of both models against integer labels, from the first classifier-shaped output."""
    for index, name in enumerate(names):
        before = _predictions(ref, index)
        after = _predictions(new, index)
        if before is None or after is None or before.shape != labels.shape:
            continue
        acc_before = float((before == labels).mean())
        acc_after = float((after == labels).mean())
        return Accuracy(
            output=name,
            samples=int(labels.size),
            before=acc_before,
            after=acc_after,
            drop_points=(acc_before - acc_after) * 100.0,
        )
    return None


def _predictions(outputs: Sequence[list[object]], index: int) -> np.ndarray | None:
    rows = []
    for run in outputs:
        array = _as_array(run[index])
        if array is None:
            return None
        if array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1:
            rows.append(np.argmax(array, axis=1))
        elif array.dtype.kind in "iu" and array.ndim == 1:
            rows.append(array.astype(np.int64))
        else:
            return None
    return np.stack(rows)


def _as_array(value: object) -> np.ndarray | None:
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return value
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        # ZipMap output of scikit-learn classifiers: a list of {class: probability} per row.
        keys = sorted(value[0])
        return np.asarray([[row[k] for k in keys] for row in value], dtype=np.float64)
    return None


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
