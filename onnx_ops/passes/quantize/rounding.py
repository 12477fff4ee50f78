"""Error-compensating rounding of an int8 weight on fixed scales (GPTQ, Frantar et al., 2022), in numpy.

The scale and zero point of every output channel are the ones ONNX Runtime's quantizer chose; only the choice
between the two nearest levels (and, through the compensation, sometimes a level further) changes. Each layer
minimises ``||X (W - Q)^T||^2`` over the calibration inputs X, whose second moment ``H = X^T X`` the capture
module gives: the inputs (columns of W) are rounded one by one, most active first, and each rounding error is
spread over the columns not yet rounded through the inverse Hessian's Cholesky factor, in blocks so the
updates are matrix products.
"""

from __future__ import annotations

import numpy as np

__all__: list[str] = []  # package-private

_BLOCK = 128


def gptq_levels(
    weight: np.ndarray,
    hessian: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    levels: tuple[int, int],
    *,
    damp: float = 0.01,
) -> np.ndarray:
    """Integer levels of `weight` on the given per-row grids, rounded with GPTQ's error compensation.

    Args:
        weight: [rows, k] float weight, one row per output channel.
        hessian: [k, k] X^T X of the layer's inputs (any positive multiple).
        scale: [rows] step of each row's grid.
        zero: [rows] zero point of each row's grid.
        levels: The smallest and largest level allowed.
        damp: Added to the diagonal, as a fraction of its mean (keeps the inverse stable).

    Returns:
        [rows, k] levels (float64 holding integers).
    """
    w = np.array(weight, np.float64)
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0  # inputs that are always zero: any level is as good, the nearest is kept
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")  # act-order: the most active inputs first
    w, h = w[:, order], h[np.ix_(order, order)]
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:  # numerically not positive definite even after damping
        return _nearest(weight, scale, zero, levels)
    step, offset = scale[:, None], zero[:, None]
    q = np.zeros_like(w)
    k = w.shape[1]
    for start in range(0, k, _BLOCK):
        end = min(start + _BLOCK, k)
        block, errors = w[:, start:end].copy(), np.zeros((w.shape[0], end - start))
        inverse = upper[start:end, start:end]
        for i in range(end - start):
            column = block[:, i]
            rounded = np.clip(np.round(column / step[:, 0]) + offset[:, 0], *levels)
            q[:, start + i] = rounded
            error = (column - (rounded - offset[:, 0]) * step[:, 0]) / inverse[i, i]
            block[:, i:] -= np.outer(error, inverse[i, i:])
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    result = np.empty_like(q)
    result[:, order] = q
    return result


def _nearest(weight: np.ndarray, scale: np.ndarray, zero: np.ndarray, levels: tuple[int, int]) -> np.ndarray:
    return np.asarray(np.clip(np.round(weight / scale[:, None]) + zero[:, None], *levels), np.float64)


def nearest_levels(weight: np.ndarray, scale: np.ndarray, zero: np.ndarray, levels: tuple[int, int]) -> np.ndarray:
    """Round-to-nearest levels of a [rows, k] weight on per-row grids (what ONNX Runtime's quantizer does)."""
    return _nearest(np.asarray(weight, np.float64), scale, zero, levels)


def layer_error(weight: np.ndarray, hessian: np.ndarray) -> float:
    """trace(E H E^T) for a weight error E [rows, k]: the squared output error over the calibration rows."""
    return float(np.sum(weight * (weight @ hessian)))
