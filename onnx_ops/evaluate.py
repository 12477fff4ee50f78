"""Measuring models with ONNX Runtime: static figures, interleaved latency (see timing); agreement: see agreement."""

from __future__ import annotations

import logging
import os
import platform
from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnx_ops.agreement import accuracy, agreement
from onnx_ops.errors import CompressionError, InvalidModelError, PassFailedError, ResourceLimitError
from onnx_ops.feeds import Feed
from onnx_ops.gzip_size import is_estimate
from onnx_ops.large import file_sizes, fits_in_one_file, serialized_chunks, session_input
from onnx_ops.report import Latency, ModelStats
from onnx_ops.timing import Timed, TimingSettings, compare
from onnx_ops.validate import clean_message, iter_tensors

__all__ = [
    "Runner",
    "accuracy",
    "agreement",
    "compare_latency",
    "cpu_name",
    "measure_latency",
    "memory_limit_text",
    "model_stats",
    "out_of_memory",
    "procfs_message",
    "structure_stats",
]

logger = logging.getLogger(__name__)

# How ONNX Runtime words running out of memory (an address-space limit also makes thread creation fail).
# What ONNX Runtime says when it cannot open a model's data files because /proc is not mounted.
_PROCFS = "requires procfs"
_OOM_MARKERS = ("Failed to allocate memory", "bad_alloc", "out of memory", "Cannot allocate memory")


def _is_out_of_memory(e: BaseException, message: str) -> bool:
    return isinstance(e, MemoryError) or any(m in message for m in _OOM_MARKERS)


def out_of_memory(e: BaseException) -> bool:
    """True when `e` (or what it wraps) says the process ran out of memory."""
    while e is not None:
        if _is_out_of_memory(e, str(e)):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def memory_limit_text() -> str:
    """' (this process may use N MB of address space)' when an address-space limit is set, else ''."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return ""
    return "" if soft == resource.RLIM_INFINITY else f" (this process may use {soft >> 20} MB of address space)"


def model_stats(model: onnx.ModelProto) -> ModelStats:
    """Size on disk, gzip size, parameters, zero fraction and op histogram of a model."""
    size_bytes, gzip_bytes = file_sizes(model)  # past 2 GiB: the .onnx file and its data file
    params = zeros = 0
    for _, tensor in iter_tensors(model):
        if tensor.data_type == onnx.TensorProto.STRING:
            continue
        array = numpy_helper.to_array(tensor)
        params += array.size
        zeros += int(array.size - np.count_nonzero(array))
    return ModelStats(
        size_bytes=size_bytes,
        gzip_bytes=gzip_bytes,
        gzip_estimated=is_estimate(size_bytes),
        parameters=params,
        zero_fraction=zeros / params if params else 0.0,
        **structure_stats(model),
    )


def structure_stats(model: onnx.ModelProto) -> dict[str, Any]:
    """The figures of ModelStats that read no weight: nodes, op histogram and opset."""
    ops: Counter[str] = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node
    )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return {"nodes": len(model.graph.node), "op_counts": dict(sorted(ops.items())), "opset": opset}


class Runner:
    """An ONNX Runtime CPU session over one model, with errors turned into our exceptions.

    Given a file (best with its weights in a data file beside it: ONNX Runtime maps them), the session holds one
    copy of the weights; given bytes or a proto, ONNX Runtime also keeps the serialized model it was given (a
    proto past 2 GiB goes through temp files, see onnx_ops.large).
    """

    def __init__(
        self, model: onnx.ModelProto | bytes | str | os.PathLike[str], *, threads: int = 0, what: str = "model"
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.what = what
        self.threads = threads
        try:
            try:
                with session_input(model) as data:  # a path (with its data files) past 2 GiB
                    self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            except Exception as e:
                if _PROCFS not in str(e) or isinstance(model, (bytes, onnx.ModelProto)):
                    raise
                self.session = _without_procfs(model, options, what)
        except CompressionError:
            raise
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


def procfs_message(what: str) -> str | None:
    """Why ONNX Runtime cannot read a model's data files when /proc is not mounted (None when it is)."""
    if os.path.isdir("/proc/self/fd"):
        return None
    return (
        f"ONNX Runtime cannot read the {what}'s weights from its data file: it opens data files through /proc, "
        "which is not mounted here (mount procfs at /proc, as container runtimes do)"
    )


def _without_procfs(path: str | os.PathLike[str], options: ort.SessionOptions, what: str) -> ort.InferenceSession:
    """A session over a model file with external data when ONNX Runtime cannot open data files (no /proc).

    A model that fits one file is read in and given whole; a larger one cannot be, and is refused naming why.
    """
    model = onnx.load(os.fspath(path))  # onnx's own reader needs no /proc
    if not fits_in_one_file(model):
        raise PassFailedError(procfs_message(what) or f"ONNX Runtime cannot read the {what}'s data file")
    data = b"".join(serialized_chunks(model))
    del model
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


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
