"""Capture with the teacher run once: its layer outputs kept on disk, the student rerun per sequential level.

``capture.capture`` runs teacher and student together on every feed. A sequential refit captures level after
level, and the teacher's side never changes between levels: its layer outputs Y are the targets of every level.
``Targets.record`` runs the teacher once over the feeds and writes, per capture run (a group of layers) and feed,
exactly the rows ``capture`` would have taken from it (the row-masked rows of a MatMul/Gemm output; a Conv's
output at the positions sampled with the same seed and in the same order, the positions kept too), and the
teacher's model outputs. ``Targets.capture`` then runs only the student and gives the same statistics as
``capture(teacher, student, group, feeds)``; ``Targets.output_error`` and ``Targets.rows`` replace
``output_error`` and ``capture_rows``. The files (one per group, and one for the model outputs) hold float32
activations (rows times output features per layer), read back one feed and layer at a time, so memory stays
bounded; a group's file can be dropped once its capture is done.

A layer may have a residual (``Targets.residuals``: layer name -> a student tensor of the layer's output shape):
its target is then the teacher's recorded tensor minus the student's residual, e.g. a layer whose output is
added to the residual stream fit to the teacher's sum, so that it also absorbs the error upstream layers left
in the stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from onnx_ops.capture import Feed, Layer, LayerStats, OutputError, Session, _add_output_error, sample_rows
from onnx_ops.capture_masks import AUTO, _feed_mask, find_row_mask, rows_of
from onnx_ops.im2col import outputs_at, patches, sample_positions

__all__ = ["Targets"]

_Key = tuple[str, int, str, int]  # (kind, group, name, feed)


class Targets:
    """The teacher's side of capture for some groups of layers, recorded once (see the module docstring)."""

    def __init__(self, path: Path, groups: Sequence[Sequence[Layer]], mask_name: str | None) -> None:
        self.path = path
        self.groups = [list(group) for group in groups]
        self.mask_name = mask_name
        self.model_outputs: list[str] = []
        self._places: dict[_Key, tuple[int, tuple[int, ...], np.dtype[np.generic]]] = {}
        self._positions: dict[tuple[int, str, int], tuple[np.ndarray, tuple[int, ...]]] = {}
        self._masked: set[tuple[int, str, int]] = set()
        self.residuals: dict[str, str] = {}

    @classmethod
    def record(
        cls,
        teacher: Session,
        groups: Sequence[Sequence[Layer]],
        feeds: Sequence[Feed],
        path: Path,
        *,
        positions: int = 256,
        seed: int = 0,
        row_mask: str | None = AUTO,
    ) -> Targets:
        """Run the teacher (a Session that outputs every layer's output and its model outputs) once per feed.

        Args:
            teacher: The teacher's session.
            groups: The capture runs to come, each the layers ``capture`` would get together.
            feeds: The calibration feeds.
            path: Where to write: one file per group beside it, named after it (removed by the caller).
            positions: Conv output positions sampled per feed, as in ``capture``.
            seed: The sampling seed, as in ``capture``.
            row_mask: As in ``capture``.
        """
        found = cls(path, groups, find_row_mask(feeds) if row_mask == AUTO else row_mask)
        found.model_outputs = list(teacher.model_outputs)
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(found._file(part).open("xb")) for part in [*range(len(found.groups)), -1]]
            for index, feed in enumerate(feeds):
                target = teacher.run(feed)
                mask = _feed_mask(feed, found.mask_name)
                for name in found.model_outputs:
                    found._put(files[-1], ("out", -1, name, index), target[name])
                for number, group in enumerate(found.groups):
                    rng = np.random.default_rng([seed, index])  # capture's: one per feed and run, in layer order
                    for layer in group:
                        found._record(files[number], (number, layer, index), target[layer.output], positions, rng, mask)
        return found

    def _file(self, part: int) -> Path:
        """One group's file (each group's targets in a file of their own, -1: the model outputs)."""
        return self.path.with_name(f"{self.path.name}.{'out' if part < 0 else part}")

    def drop(self, group: int) -> None:
        """Remove one group's recorded targets (its disk space), once no capture or rows of it will follow."""
        self._file(group).unlink(missing_ok=True)

    def _record(
        self,
        f: BinaryIO,
        where: tuple[int, Layer, int],
        y: np.ndarray,
        positions: int,
        rng: np.random.Generator,
        mask: np.ndarray | None,
    ) -> None:
        number, layer, index = where
        if layer.conv is None:
            masked = mask is not None and y.shape[:-1] == mask.shape
            if masked:
                self._masked.add((number, layer.name, index))
            rows = (y[mask] if masked else y).reshape(-1, layer.n)
        else:
            spatial = tuple(int(d) for d in y.shape[2:])
            sampled = sample_positions(y.shape[0], spatial, positions, rng)
            self._positions[number, layer.name, index] = (sampled, (int(y.shape[0]), *spatial))
            rows = outputs_at(y, sampled, layer.conv.groups)
        self._put(f, ("y", number, layer.name, index), rows)

    def _put(self, f: BinaryIO, key: _Key, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array)
        offset = f.tell()
        f.write(data.tobytes())
        self._places[key] = (offset, tuple(data.shape), data.dtype)

    def _get(self, key: _Key) -> np.ndarray:
        offset, shape, dtype = self._places[key]
        count = int(np.prod(shape))
        path = self._file(key[1])
        array = np.fromfile(path, dtype=dtype, count=count, offset=offset) if count else np.zeros(0, dtype)
        return array.reshape(shape)

    def group_of(self, name: str) -> int | None:
        """The recorded group holding the layer of this name (None when none does)."""
        return next((i for i, group in enumerate(self.groups) if any(la.name == name for la in group)), None)

    def capture(
        self, student: Session, group: int, feeds: Sequence[Feed], *, folds: int = 1, model_error: bool = False
    ) -> tuple[dict[str, LayerStats], OutputError]:
        """``capture(teacher, student, groups[group], feeds)`` with the recorded teacher side.

        Args:
            student: A session over the student that outputs the group's layer inputs (and, for
                ``model_error``, its model outputs).
            group: Which recorded group.
            feeds: The feeds recorded, in the same order.
            folds: As in ``capture``.
            model_error: Also measure the student's model-output error against the teacher's.
        """
        layers = self.groups[group]
        parts = {la.name: [LayerStats.empty(la.k, la.n, la.groups) for _ in range(folds)] for la in layers}
        error = [0.0, 0.0]
        for index, feed in enumerate(feeds):
            current = student.run(feed)
            mask = _feed_mask(feed, self.mask_name)
            for layer in layers:
                x = self._inputs(group, layer, index, current[layer.input], mask)
                parts[layer.name][index % folds].add(x, self._target(group, layer, index, current, mask))
            if model_error:
                self._add_error(error, index, current, mask)
        stats = {name: LayerStats.merged(fold) for name, fold in parts.items()}
        return stats, OutputError(error[0], error[1])

    def _target(self, group: int, layer: Layer, index: int, current: Feed, mask: np.ndarray | None) -> np.ndarray:
        """The recorded rows of the layer's teacher output, less the student's residual when it has one."""
        y = self._get(("y", group, layer.name, index))
        residual = self.residuals.get(layer.name)
        if residual is None:
            return y
        if layer.conv is not None:
            raise ValueError(f"Conv {layer.name!r}: a residual target is for MatMul/Gemm layers only")
        rows = self._inputs(group, dataclasses.replace(layer, k=layer.n), index, current[residual], mask)
        if rows.shape != y.shape:
            raise ValueError(f"layer {layer.name!r}: its residual's rows do not align with its output's")
        found: np.ndarray = y - rows
        return found

    def _inputs(self, group: int, layer: Layer, index: int, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """The student's regressor rows that align with the recorded target rows."""
        if layer.conv is not None:
            sampled, shape = self._positions[group, layer.name, index]
            expected = (int(x.shape[0]), *layer.conv.output_shape(tuple(x.shape[2:])))
            if expected != shape:
                raise ValueError(f"Conv {layer.name!r}: output shape {shape} does not match input {x.shape}")
            return patches(x, layer.conv, sampled)
        if (group, layer.name, index) in self._masked:
            if mask is None or x.shape[:-1] != mask.shape:
                raise ValueError(f"layer {layer.name!r}: its input's rows do not align with its output's")
            x = x[mask]
        rows: np.ndarray = x.reshape(-1, layer.k)
        return rows

    def _add_error(self, error: list[float], index: int, current: Feed, mask: np.ndarray | None) -> None:
        target = {name: self._get(("out", -1, name, index)) for name in self.model_outputs}
        _add_output_error(error, self.model_outputs, target, current, mask)

    def output_error(self, student: Session, feeds: Sequence[Feed]) -> OutputError:
        """``output_error(teacher, student, feeds)`` with the recorded teacher outputs (a full student session)."""
        error = [0.0, 0.0]
        for index, feed in enumerate(feeds):
            self._add_error(error, index, student.run(feed), _feed_mask(feed, self.mask_name))
        return OutputError(error[0], error[1])

    def rows(
        self, student: Session, names: Sequence[str], layer: Layer, feeds: Sequence[Feed], *, max_rows: int = 16384
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``capture_rows(teacher, student, names, [layer.output], feeds)`` for a recorded MatMul/Gemm layer.

        `student` outputs the tensors `names`; the teacher's rows of the layer's output are the recorded ones.
        """
        group = self.group_of(layer.name)
        if group is None or layer.conv is not None:
            raise ValueError(f"layer {layer.name!r}: no recorded MatMul/Gemm output")

        def found(index: int, feed: Feed) -> dict[str, np.ndarray]:
            current, mask = student.run(feed), _feed_mask(feed, self.mask_name)
            rows = {name: rows_of(current[name], mask) for name in names}
            return rows | {f"teacher:{layer.output}": self._get(("y", group, layer.name, index))}

        return sample_rows(found, feeds, max_rows=max_rows)
