"""What every compression pass shares: the context it runs in and the log it fills for the report."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_ops.feeds import Feed
from onnx_ops.memory import release_memory
from onnx_ops.progress import CalibrationReader, Tracker
from onnx_ops.report import LayerChange, Skipped
from onnx_ops.validate import short_name

__all__ = [
    "Feed",
    "PassContext",
    "PassLog",
    "constant_array",
    "is_constant_weight",
    "non_finite_reason",
    "release_memory",
    "release_proto",
    "set_constant",
    "sum_squares",
]


@dataclasses.dataclass
class PassLog:
    """What a pass changed, skipped and warns about; the pipeline copies it into the report."""

    layers: list[LayerChange] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    summary: dict[str, float | int | str | bool | list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, name: str, reason: str) -> None:
        """Record a candidate that was left alone."""
        self.skipped.append(Skipped(name=name, reason=reason))


@dataclasses.dataclass(frozen=True)
class PassContext:
    """Inputs a pass may need beyond its step.

    Attributes:
        workdir: A private, existing temporary directory the pass may write to.
        calibration: Calibration feeds (one dict of input name -> array per model run), or None.
        input_shapes: Concrete shape of one sample for every graph input.
        progress: Where the running pass reports its progress (its own share of the job), or None.
        teacher: The model before the plan (what distill recovers towards), or None.
        source: The job's model file this pass's model was loaded from, its weights mapped and unchanged (the
            plan's first step), or None. A pass that writes the model for ONNX Runtime may refer to those weights
            (onnx_ops.job_files.save_sharing) or use the file itself instead of writing them again.
    """

    workdir: Path
    calibration: Sequence[Feed] | None = None
    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    progress: Tracker | None = None
    teacher: onnx.ModelProto | None = None
    source: Path | None = None

    def calibration_reader(self, feeds: Sequence[Feed]) -> CalibrationReader:
        """A reader handing `feeds` to ONNX Runtime's calibrator that reports each batch in the pass's progress."""
        if self.progress is None:
            return CalibrationReader(feeds)
        return CalibrationReader(feeds, self.progress.part(0.0, 0.8).counter("calibration batch", len(feeds)))

    @property
    def unchanged_source(self) -> Path | None:
        """The job's model file whose data file still holds this model's weights, or None: the one sharing rule.

        Set on the plan's first step only (`source`): there the weights are mapped from the job's data file and no
        pass has changed one in place (a mapping is copy-on-write: a weight changed in memory is not changed in
        its file; a weight a pass replaced is a new tensor). A file written for ONNX Runtime may then refer to
        the weights there (onnx_ops.job_files.save_sharing), or be the job's file itself; on a later step every
        weight is written.
        """
        return self.source


def is_constant_weight(value: ir.Value | None) -> bool:
    """True if value is an initializer that a user cannot override as a graph input."""
    if value is None or value.const_value is None:
        return False
    graph = value.graph
    return graph is None or value not in graph.inputs


def constant_array(value: ir.Value) -> np.ndarray:
    """The numpy array of a constant weight (see is_constant_weight)."""
    assert value.const_value is not None
    return value.const_value.numpy()


def non_finite_reason(value: ir.Value | None) -> str | None:
    """Why a pass must leave this constant unchanged: it holds infinities (a mask, the identity of Max).

    Validation refuses NaN anywhere but accepts infinities; scaling, rounding or factorizing them would
    turn them into NaN. None when the value is not a float constant or holds only finite values.
    """
    tensor = value.const_value if value is not None else None
    if tensor is None or not tensor.dtype.is_floating_point() or np.isfinite(tensor.numpy()).all():
        return None
    return f"weight {short_name(value.name if value is not None else '?')} holds infinite values"


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replace the tensor of an initializer, keeping its name, and update its declared type/shape."""
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)


def release_proto(model: ir.Model) -> None:
    """Copy the weights still read from a parsed ModelProto into arrays of their own, then free the proto.

    The tensors of a parsed model share one protobuf arena, freed only with the last of them: a pass that
    replaced its large weights one by one still holds the whole float model through the small ones it left.
    """
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.TensorProtoTensor):
                value.const_value = ir.tensor(tensor.numpy().copy(), name=value.name)
    release_memory()


def sum_squares(array: np.ndarray) -> float:
    """The sum of squares in float64, a chunk at a time (no float64 copy of the whole array)."""
    flat = array.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, 1 << 20):
        chunk = flat[start : start + (1 << 20)].astype(np.float64)
        total += float(chunk @ chunk)
    return total
