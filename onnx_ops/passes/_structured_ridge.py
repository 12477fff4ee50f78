"""Ridge least squares of one layer from its sufficient statistics, for many ridge terms, cross-validated.

The bias is never damped, so it is solved for exactly: centering X and Y by their means removes it, the
weights solve ``(Xc^T Xc + lambda I) W = Xc^T Yc + lambda W_prior`` and the bias is ``mean(Y) - mean(X) W``.
One eigendecomposition of Xc^T Xc serves every lambda, which makes choosing lambda by cross-validation cost
about as much as one solve. The ridge pulls towards the prior (the pruned weights), not towards zero, so a
direction the calibration data never excites keeps its weights.
"""

from __future__ import annotations

import numpy as np

from onnx_ops.capture import LayerStats

__all__ = ["RidgePath", "cross_validate"]


class RidgePath:
    """Ridge fits of one layer's statistics towards a prior, for any damping.

    Args:
        stats: The layer's statistics (X with a trailing column of ones).
        prior: [k + 1, n] the current weights, last row the bias.
        bias: Fit the bias too; else it stays at the prior's.
    """

    def __init__(self, stats: LayerStats, prior: np.ndarray, bias: bool) -> None:
        k = prior.shape[0] - 1
        xtx, xty = stats.xtx, stats.xty
        self.prior, self.bias, self.k = prior, bias, k
        diagonal = np.diag(xtx)[:k]
        self.scale = float(diagonal.mean()) if k else 0.0
        self.floor = 1e-12 * max(float(diagonal.max(initial=0.0)), 1.0)
        rows = float(xtx[k, k])
        if bias and rows > 0:
            self.mean_x, self.mean_y = xtx[:k, k] / rows, xty[k] / rows
            gram = xtx[:k, :k] - rows * np.outer(self.mean_x, self.mean_x)
            rhs = xty[:k] - rows * np.outer(self.mean_x, self.mean_y)
        else:
            self.bias = False
            gram, rhs = xtx[:k, :k], xty[:k] - np.outer(xtx[:k, k], prior[k])
        values, self.vectors = np.linalg.eigh((gram + gram.T) / 2)
        self.values = np.maximum(values, 0.0)
        self.rotated_rhs = self.vectors.T @ rhs
        self.rotated_prior = self.vectors.T @ prior[:k]

    def solve(self, damping: float) -> np.ndarray:
        """[k + 1, n] weights and bias for a ridge term of ``damping`` times the mean of diag(X^T X)."""
        lam = max(damping * self.scale, self.floor)
        weights = self.vectors @ ((self.rotated_rhs + lam * self.rotated_prior) / (self.values + lam)[:, None])
        result = self.prior.copy()
        result[: self.k] = weights
        if self.bias:
            result[self.k] = self.mean_y - self.mean_x @ weights
        return result


def cross_validate(parts: list[LayerStats], prior: np.ndarray, bias: bool, damping: float) -> tuple[float, float]:
    """Two-fold choice among ``damping * 10^j``, j = -1..3: the damping and its summed held-out squared error.

    With one part, the damping as given and that part's own (training) error.
    """
    grid = [damping * 10.0**j for j in range(-1, 4)] if damping > 0 else [0.0]
    paths = [RidgePath(part, prior, bias) for part in parts]
    if len(parts) < 2:
        return damping, parts[0].squared_error(paths[0].solve(damping))
    scores = [sum(parts[1 - i].squared_error(paths[i].solve(lam)) for i in range(2)) for lam in grid]
    best = int(np.argmin(scores))
    return grid[best], float(scores[best])
