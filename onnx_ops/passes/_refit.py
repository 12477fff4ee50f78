"""Closed-form refit of one pruned linear layer from its captured statistics (ridge least squares, mask kept).

For every output column j of every group, the weights pruning kept are refit:
``w_j[m_j] = (X_m^T X_m + lambda I)^-1 (X_m^T y_j + lambda w_j_pruned)`` with X the student's layer inputs
(MatMul/Gemm rows, or a Conv's sampled im2col patches), y_j the teacher's layer output and m_j the
column's kept inputs. Zeros stay zero, so unstructured and N:M patterns are kept exactly; the bias, when
the layer has one, is fit with the weights and not damped.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import lapack

from onnx_ops.capture import LayerStats
from onnx_ops.passes._base import PassLog
from onnx_ops.passes._layers import Linear
from onnx_ops.report import LayerChange

__all__ = ["refit", "solve_masked"]

_CHUNK_BYTES = 64 * 2**20  # sub-matrices of the Gram matrix gathered at once by solve_masked


def refit(target: Linear, stats: LayerStats, damping: float, log: PassLog) -> int:
    """Refit one layer from its statistics; 1 if the new weights lower the layer's error, else 0."""
    layer = target.layer
    matrices = target.matrices()  # [g, k, n]
    fit_bias = target.bias is not None and target.beta != 0.0
    current = np.concatenate([matrices, target.bias_rows()[:, None, :]], axis=1)  # [g, k + 1, n]
    solved = np.stack([solve_masked(stats.group(g), current[g], fit_bias, damping) for g in range(layer.groups)])
    if layer.groups == 1:
        before, after = stats.squared_error(current[0]), stats.squared_error(solved[0])
    else:
        before, after = stats.squared_error(current), stats.squared_error(solved)
    reference = max(float(stats.yty.sum()), np.finfo(np.float64).tiny)
    if not np.all(np.isfinite(solved)) or after >= before:
        log.skip(layer.name, f"the refit did not lower the layer's error ({before / reference:.3g})")
        return 0
    shape = list(target.weight.const_value.shape) if target.weight.const_value is not None else []
    target.store(solved[:, :-1], solved[:, -1] if fit_bias else None)
    kept = solved[:, :-1]
    log.layers.append(
        LayerChange(
            name=layer.name,
            op_type=target.node.op_type,
            weight=target.weight.name or "?",
            shape_before=shape,
            shape_after=shape,
            params_before=int(kept.size),
            params_after=int(kept.size),
            sparsity=float(np.mean(kept == 0)),
            note=f"layer output relative squared error {before / reference:.4g} -> {after / reference:.4g} "
            f"(level {target.level}, {stats.rows} rows)",
        )
    )
    return 1


def solve_masked(stats: LayerStats, prior: np.ndarray, bias: bool, damping: float) -> np.ndarray:
    """Ridge least squares per output column over its kept inputs; [k + 1, n] with zeros where prior has.

    The ridge pulls the weights towards the pruned ones rather than towards zero, so an input direction the
    calibration data never excites (a dead unit) keeps its weight instead of losing it. Columns that keep
    the same inputs (an unpruned column, N:M patterns that repeat) share one solve; the others, one solve
    each, are gathered in chunks of equal size (per-row exact-count pruning keeps the same number of inputs
    in every column), at most _CHUNK_BYTES of sub-matrices at a time.

    Args:
        stats: The layer's statistics (X with a trailing column of ones), one group's for a grouped layer.
        prior: [k + 1, n] the current weights (last row: the bias); its zeros in the first k rows are the mask.
        bias: Also fit the bias row (the last row of the result); else it stays zero.
        damping: Ridge term relative to the mean of diag(X^T X) over the k inputs (the bias is not damped).
    """
    k, n = prior.shape[0] - 1, prior.shape[1]
    gram, target = _system(stats, prior, damping)
    unknown = np.vstack([prior[:-1] != 0, np.full((1, n), bias)])  # [k + 1, n]: what each column solves for
    result = np.zeros((k + 1, n))
    _, inverse, counts = np.unique(np.packbits(unknown.T, axis=1), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    for columns in np.split(order, np.cumsum(counts)[:-1]):
        if columns.size > 1:  # one solve with every column of this pattern as its right-hand sides
            rows = np.flatnonzero(unknown[:, columns[0]])
            if rows.size:
                result[np.ix_(rows, columns)] = _solve(gram[np.ix_(rows, rows)], target[np.ix_(rows, columns)])
    single = np.flatnonzero(counts[inverse] == 1)
    sizes = np.count_nonzero(unknown[:, single], axis=0)
    for size in np.unique(sizes[sizes > 0]):
        same = single[sizes == size]
        step = max(1, _CHUNK_BYTES // (8 * int(size) ** 2))
        for start in range(0, same.size, step):
            columns = same[start : start + step]
            index = np.nonzero(unknown[:, columns].T)[1].reshape(columns.size, size)  # [c, size], ascending
            subs = gram[index[:, :, None], index[:, None, :]]
            rhs = target[index, columns[:, None]]
            result[index, columns[:, None]] = np.stack([_solve(a, b) for a, b in zip(subs, rhs, strict=True)])
    return result


def _system(stats: LayerStats, prior: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """The damped normal equations of every column: X^T X + diag(ridge), and X^T Y + ridge * prior."""
    k = prior.shape[0] - 1
    diagonal = np.diag(stats.xtx)[:k]
    ridge = np.zeros(k + 1)
    ridge[:k] = max(damping * float(diagonal.mean()) if k else 0.0, 1e-12 * max(float(diagonal.max(initial=0)), 1.0))
    return stats.xtx + np.diag(ridge), stats.xty + ridge[:, None] * prior


def _solve(sub: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """sub^-1 rhs for a symmetric sub-matrix of the damped Gram: by Cholesky, else LU, else least squares."""
    factor, info = lapack.dpotrf(sub, lower=True)
    if info == 0:
        solved, info = lapack.dpotrs(factor, rhs, lower=True)
        if info == 0:
            return np.asarray(solved)
    try:
        return np.linalg.solve(sub, rhs)
    except np.linalg.LinAlgError:
        return np.asarray(np.linalg.lstsq(sub, rhs, rcond=None)[0])
