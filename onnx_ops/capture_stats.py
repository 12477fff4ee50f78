"""The records of activation capture: the layers it reads, their least-squares statistics, the output error.

See ``onnx_ops.capture`` for how the statistics are gathered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from onnx_ops.im2col import ConvGeometry

__all__ = ["Layer", "LayerStats", "OutputError"]


@dataclasses.dataclass(frozen=True)
class Layer:
    """Where one linear layer reads and writes, by tensor name (the same in the teacher and the student).

    Attributes:
        name: The layer's name for reports.
        input: The activation the layer multiplies by its weight (X).
        output: The tensor compared with the teacher: the product, or the bias Add's output.
        k: Input features (X's last dimension; a Conv's Cin/groups * prod(kernel)).
        n: Output features (Y's last dimension; a Conv's Cout/groups).
        conv: The Conv's geometry, or None for MatMul/Gemm.
    """

    name: str
    input: str
    output: str
    k: int
    n: int
    conv: ConvGeometry | None = None

    @property
    def groups(self) -> int:
        """Independent groups with their own statistics (a grouped Conv's groups, else 1)."""
        return self.conv.groups if self.conv is not None else 1


@dataclasses.dataclass
class LayerStats:
    """Sufficient statistics of least squares for one layer, in float64.

    A layer with groups > 1 (grouped Conv) has a leading [groups] axis on every array; ``group(i)``
    gives one group's 2-D statistics.

    Attributes:
        xtx: [k + 1, k + 1] X^T X of the student's inputs with a trailing column of ones.
        xty: [k + 1, n] X^T Y against the teacher's outputs.
        yty: [n] Sum of squares of each teacher output column.
        rows: Rows (tokens, samples or sampled positions) seen.
        folds: The same statistics per fold of the calibration feeds (empty unless capture was asked for folds).
    """

    xtx: np.ndarray
    xty: np.ndarray
    yty: np.ndarray
    rows: int = 0
    folds: list[LayerStats] = dataclasses.field(default_factory=list)

    @classmethod
    def merged(cls, parts: Sequence[LayerStats]) -> LayerStats:
        """The statistics of all parts together; with several parts, they are its ``folds``."""
        if len(parts) == 1:
            return parts[0]
        whole = cls(
            np.sum([p.xtx for p in parts], axis=0),
            np.sum([p.xty for p in parts], axis=0),
            np.sum([p.yty for p in parts], axis=0),
            sum(p.rows for p in parts),
        )
        whole.folds = list(parts)
        return whole

    @classmethod
    def empty(cls, k: int, n: int, groups: int = 1) -> LayerStats:
        """Zero statistics for a layer with k inputs and n outputs (per group when groups > 1)."""
        lead = (groups,) if groups > 1 else ()
        return cls(np.zeros((*lead, k + 1, k + 1)), np.zeros((*lead, k + 1, n)), np.zeros((*lead, n)))

    @property
    def groups(self) -> int:
        """Groups with their own statistics (1 for an ungrouped layer)."""
        return int(self.xtx.shape[0]) if self.xtx.ndim == 3 else 1

    def group(self, index: int) -> LayerStats:
        """One group's statistics as 2-D arrays (views; the layer itself when it has no groups)."""
        if self.xtx.ndim == 2:
            return self
        one = LayerStats(self.xtx[index], self.xty[index], self.yty[index], self.rows)
        one.folds = [fold.group(index) for fold in self.folds]
        return one

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Accumulate one batch: x [rows, k] student inputs, y [rows, n] teacher outputs ([rows, groups, .])."""
        if not x.shape[0]:
            return
        grouped = self.xtx.ndim == 3
        xg = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 0, 2)  # [groups, rows, k]
        yg = y.reshape(y.shape[0], -1, y.shape[-1]).transpose(1, 0, 2).astype(np.float64)
        x1 = np.empty((xg.shape[0], xg.shape[1], xg.shape[2] + 1))
        x1[..., :-1] = xg
        x1[..., -1] = 1.0
        x1t = x1.transpose(0, 2, 1)
        xtx, xty, yty = x1t @ x1, x1t @ yg, np.einsum("gij,gij->gj", yg, yg)
        self.xtx += xtx if grouped else xtx[0]
        self.xty += xty if grouped else xty[0]
        self.yty += yty if grouped else yty[0]
        self.rows += x.shape[0]

    def squared_error(self, weight: np.ndarray) -> float:
        """Sum of squared errors of X @ weight against Y, where weight is [k + 1, n] (last row: the bias).

        A grouped layer takes [groups, k + 1, n] and sums over its groups.
        """
        return float(np.sum(weight * (self.xtx @ weight)) - 2.0 * np.sum(weight * self.xty) + self.yty.sum())

    def input_norms(self) -> np.ndarray:
        """[k] (or [groups, k]) L2 norm of each input feature over all rows: sqrt(diag(X^T X))."""
        diagonal = np.diagonal(self.xtx, axis1=-2, axis2=-1)[..., :-1]
        norms: np.ndarray = np.sqrt(np.maximum(diagonal, 0.0))
        return norms


@dataclasses.dataclass(frozen=True)
class OutputError:
    """Relative squared error of the student's float outputs against the teacher's: sum (s - t)^2 / sum t^2."""

    squared_error: float
    reference: float

    @property
    def relative(self) -> float:
        """The relative squared error (0 when the teacher's outputs are all zero and match)."""
        return self.squared_error / self.reference if self.reference > 0 else float(self.squared_error > 0)
