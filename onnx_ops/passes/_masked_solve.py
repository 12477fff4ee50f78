"""Ridge least squares of every output column of a layer over the inputs its mask keeps, many columns at once.

Column j solves ``G[m_j, m_j] w = b[m_j]`` with G the damped X^T X, b the damped X^T y_j and m_j the
column's kept inputs. Each column has its own mask, so each needs its own factorization: the work is
n * |m|^3 / 3 and nothing exact shares it. What is done about it:

* columns that keep the same inputs (unpruned columns, N:M patterns that repeat) share one solve;
* the other columns are taken in chunks of equal size (per-row exact-count pruning keeps the same number
  of inputs in every column), their sub-matrices gathered at once, at most _CHUNK_BYTES at a time;
* each is factored by Cholesky in float32 (twice the speed of float64, a quarter of LU's work) and the
  solution refined in float64 (the residual of all the chunk's columns in one matrix product) until its
  backward error is that of a float64 solve, as LAPACK's dsposv does; a column whose float32 factor
  fails or does not converge is solved in float64 (Cholesky, else LU, else least squares).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import lapack

from onnx_ops.capture import LayerStats

__all__ = ["solve_masked"]

_CHUNK_BYTES = 64 * 2**20  # float32 sub-matrices gathered at once
_REFINE = 10  # refinement steps before a column falls back to float64
_EPS = float(np.finfo(np.float64).eps)


def solve_masked(stats: LayerStats, prior: np.ndarray, bias: bool, damping: float) -> np.ndarray:
    """Ridge least squares per output column over its kept inputs; [k + 1, n] with zeros where prior has.

    The ridge pulls the weights towards the pruned ones rather than towards zero, so an input direction the
    calibration data never excites (a dead unit) keeps its weight instead of losing it.

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
    for columns in np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1]):
        rows = np.flatnonzero(unknown[:, columns[0]])
        if columns.size > 1 and rows.size:  # one solve with every column of this pattern as its right-hand sides
            result[np.ix_(rows, columns)] = _solve(gram[np.ix_(rows, rows)], target[np.ix_(rows, columns)])
    single = np.flatnonzero(counts[inverse] == 1)
    sizes = np.count_nonzero(unknown[:, single], axis=0)
    chunks = _Chunks(gram, target)
    for size in np.unique(sizes[sizes > 0]):
        same = single[sizes == size]
        step = max(1, _CHUNK_BYTES // (4 * int(size) ** 2))
        for start in range(0, same.size, step):
            columns = same[start : start + step]
            index = np.nonzero(unknown[:, columns].T)[1].reshape(columns.size, size)  # [c, size], ascending
            result[index, columns[:, None]] = chunks.solve(index, columns)
    return result


class _Chunks:
    """Solves chunks of columns with the same number of unknowns: float32 Cholesky, float64 refinement."""

    def __init__(self, gram: np.ndarray, target: np.ndarray) -> None:
        self.gram, self.target = gram, target
        self.gram32 = gram.astype(np.float32)
        self.row_norms = np.abs(gram).sum(axis=1)  # bounds the infinity norm of any sub-matrix's rows

    def solve(self, index: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """[c, size] solutions of the columns whose unknowns are the rows in index ([c, size])."""
        count, size = index.shape
        subs = self.gram32[index[:, :, None], index[:, None, :]]
        rhs = self.target[index, columns[:, None]]
        solution: np.ndarray = np.zeros_like(rhs)
        factors: list[np.ndarray | None] = []
        for i in range(count):
            # subs[i] is symmetric, so its transpose is the same matrix in Fortran order: factored in place.
            factor, info = lapack.spotrf(subs[i].T, lower=False, overwrite_a=True, clean=False)
            factors.append(factor if info == 0 else None)
            if info == 0:
                solution[i] = lapack.spotrs(factor, rhs[i].astype(np.float32), lower=False)[0]
        bound = _EPS * np.sqrt(size) * self.row_norms[index].max(axis=1)
        pending = np.array([f is not None for f in factors])
        for attempt in range(_REFINE + 1):
            residual = rhs - self._product(index, solution)
            pending &= np.abs(residual).max(axis=1) > bound * np.abs(solution).max(axis=1)
            if not pending.any() or attempt == _REFINE:
                break
            for j in np.flatnonzero(pending):
                solution[j] += lapack.spotrs(factors[j], residual[j].astype(np.float32), lower=False)[0]
        failed = pending | np.array([f is None for f in factors])  # no float32 factor, or not converged
        for j in np.flatnonzero(failed):
            solution[j] = _solve(self.gram[np.ix_(index[j], index[j])], rhs[j])
        return solution

    def _product(self, index: np.ndarray, solution: np.ndarray) -> np.ndarray:
        """[c, size] G[m_j, m_j] @ solution_j for every column j, as one float64 matrix product."""
        full = np.zeros((self.gram.shape[0], index.shape[0]))
        chunk = np.arange(index.shape[0])[:, None]
        full[index, chunk] = solution
        product: np.ndarray = (self.gram @ full).T[chunk, index]
        return product


def _system(stats: LayerStats, prior: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """The damped normal equations of every column: X^T X + diag(ridge), and X^T Y + ridge * prior."""
    k = prior.shape[0] - 1
    diagonal = np.diag(stats.xtx)[:k]
    ridge = np.zeros(k + 1)
    ridge[:k] = max(damping * float(diagonal.mean()) if k else 0.0, 1e-12 * max(float(diagonal.max(initial=0)), 1.0))
    return stats.xtx + np.diag(ridge), stats.xty + ridge[:, None] * prior


def _solve(sub: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """sub^-1 rhs in float64 for a symmetric sub-matrix of the damped Gram: Cholesky, else LU, else least squares."""
    factor, info = lapack.dpotrf(sub, lower=True)
    if info == 0:
        solved, info = lapack.dpotrs(factor, rhs, lower=True)
        if info == 0:
            return np.asarray(solved)
    try:
        return np.linalg.solve(sub, rhs)
    except np.linalg.LinAlgError:
        return np.asarray(np.linalg.lstsq(sub, rhs, rcond=None)[0])
