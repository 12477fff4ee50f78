"""Activation capture for layer-wise reconstruction: teacher outputs against student inputs, streamed.

The teacher is the model before the plan and the student the partly compressed one. Both run in ONNX
Runtime on the same calibration feeds, with the tensors of interest added as extra graph outputs of a
copy of each model. Per layer, the student's input activations X (rows are tokens or samples: every
leading dimension flattened) and the teacher's layer output Y are reduced on the fly to the sufficient
statistics of least squares, X^T X, X^T Y and the squares of Y, with a column of ones appended to X for the
bias. No activation is kept past the feed that produced it, so memory depends on the layers' widths,
not on the amount of data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["Layer", "LayerStats", "OutputError", "Session", "capture", "output_error"]

Feed = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Layer:
    """Where one linear layer reads and writes, by tensor name (the same in the teacher and the student).

    Attributes:
        name: The layer's name for reports.
        input: The activation the layer multiplies by its weight (X).
        output: The tensor compared with the teacher: the product, or the bias Add's output.
        k: Input features (X's last dimension).
        n: Output features (Y's last dimension).
    """

    name: str
    input: str
    output: str
    k: int
    n: int


@dataclasses.dataclass
class LayerStats:
    """Sufficient statistics of least squares for one layer, in float64.

    Attributes:
        xtx: [k + 1, k + 1] X^T X of the student's inputs with a trailing column of ones.
        xty: [k + 1, n] X^T Y against the teacher's outputs.
        yty: [n] Sum of squares of each teacher output column.
        rows: Rows (tokens or samples) seen.
    """

    xtx: np.ndarray
    xty: np.ndarray
    yty: np.ndarray
    rows: int = 0

    @classmethod
    def empty(cls, k: int, n: int) -> LayerStats:
        """Zero statistics for a layer with k inputs and n outputs."""
        return cls(np.zeros((k + 1, k + 1)), np.zeros((k + 1, n)), np.zeros(n))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Accumulate one batch: x [rows, k] student inputs, y [rows, n] teacher outputs."""
        x1 = np.empty((x.shape[0], x.shape[1] + 1))
        x1[:, :-1] = x
        x1[:, -1] = 1.0
        y64 = y.astype(np.float64)
        self.xtx += x1.T @ x1
        self.xty += x1.T @ y64
        self.yty += np.einsum("ij,ij->j", y64, y64)
        self.rows += x.shape[0]

    def squared_error(self, weight: np.ndarray) -> float:
        """Sum of squared errors of X @ weight against Y, where weight is [k + 1, n] (last row: the bias)."""
        return float(np.sum(weight * (self.xtx @ weight)) - 2.0 * np.sum(weight * self.xty) + self.yty.sum())


@dataclasses.dataclass(frozen=True)
class OutputError:
    """Relative squared error of the student's float outputs against the teacher's: sum (s - t)^2 / sum t^2."""

    squared_error: float
    reference: float

    @property
    def relative(self) -> float:
        """The relative squared error (0 when the teacher's outputs are all zero and match)."""
        return self.squared_error / self.reference if self.reference > 0 else float(self.squared_error > 0)


class Session:
    """An ONNX Runtime session over a copy of a model that also outputs the named intermediate tensors."""

    def __init__(self, model: onnx.ModelProto, extra: Iterable[str], threads: int = 0) -> None:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        outputs = {o.name for o in copy.graph.output}
        self.model_outputs = [o.name for o in copy.graph.output]
        for name in dict.fromkeys(extra):
            if name not in outputs:
                copy.graph.output.append(onnx.ValueInfoProto(name=name))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        data = copy.SerializeToString()
        del copy
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run on one feed (inputs the model does not have are left out); every output by name."""
        inputs = {i.name for i in self.session.get_inputs()}
        values = self.session.run(None, {k: v for k, v in feed.items() if k in inputs})
        return dict(zip(self.names, values, strict=True))


def capture(
    teacher: onnx.ModelProto | Session,
    student: onnx.ModelProto,
    layers: Sequence[Layer],
    feeds: Sequence[Feed],
    *,
    threads: int = 0,
) -> tuple[dict[str, LayerStats], OutputError]:
    """Run teacher and student on every feed and reduce each layer's activations to LayerStats.

    Args:
        teacher: The model whose layer outputs are the targets, or a Session over it that outputs them
            (built once, it serves every call).
        student: The model whose layer inputs are the regressors (same tensor names as the teacher).
        layers: The layers to capture.
        feeds: Calibration feeds, one dict per run; both models see the same feed, so rows align.
        threads: ONNX Runtime intra-op threads (0: its default).

    Returns:
        Statistics per layer name, and the error of the student's model outputs on these feeds.
    """
    teacher_run = teacher if isinstance(teacher, Session) else Session(teacher, (la.output for la in layers), threads)
    student_run = Session(student, (layer.input for layer in layers), threads)
    stats = {layer.name: LayerStats.empty(layer.k, layer.n) for layer in layers}
    error = [0.0, 0.0]
    for feed in feeds:
        target = teacher_run.run(feed)
        current = student_run.run(feed)
        for layer in layers:
            x = current[layer.input].reshape(-1, layer.k)
            y = target[layer.output].reshape(-1, layer.n)
            stats[layer.name].add(x, y)
        _add_output_error(error, teacher_run.model_outputs, target, current)
    return stats, OutputError(error[0], error[1])


def output_error(
    teacher: onnx.ModelProto | Session, student: onnx.ModelProto, feeds: Sequence[Feed], *, threads: int = 0
) -> OutputError:
    """Relative squared error of the student's float outputs against the teacher's on these feeds."""
    return capture(teacher, student, [], feeds, threads=threads)[1]


def _add_output_error(total: list[float], names: list[str], target: Feed, current: Feed) -> None:
    for name in names:
        t, s = target[name], current[name]
        if not np.issubdtype(t.dtype, np.floating) or t.shape != s.shape:
            continue
        t64 = t.astype(np.float64)
        finite = np.isfinite(t64)
        total[0] += float(np.sum((s.astype(np.float64)[finite] - t64[finite]) ** 2))
        total[1] += float(np.sum(t64[finite] ** 2))
