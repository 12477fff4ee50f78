"""The ridge term of a pruned layer's refit, chosen by two-fold cross-validation over the calibration feeds.

A layer with many inputs fit on few rows (a transformer's FFN on a few hundred sentences) interpolates the
calibration data: its error there falls while its error on other inputs does not. So the refit's damping is
chosen among ``damping * 10^j`` (j = -1..3) by how well the fit on one fold of the feeds (even or odd ones)
predicts the other, on a sample of the layer's output columns (each column is an independent problem, so a
sample estimates the whole at a fraction of its cost). When no damping predicts the held-out fold better than
the pruned weights themselves, the layer is better left as pruned.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnx_ops.capture import LayerStats
from onnx_ops.passes._layers import Linear
from onnx_ops.passes._refit import solve_masked

__all__ = ["Choice", "choose_damping", "layer_choice"]

_COLUMNS = 32  # output columns sampled per layer


@dataclasses.dataclass(frozen=True)
class Choice:
    """The damping chosen and the held-out squared errors (summed over both folds, on the sampled columns).

    Attributes:
        damping: The ridge term to refit the whole layer with.
        refit: Held-out error of the refit at that damping.
        pruned: Held-out error of the pruned weights (no refit).
    """

    damping: float
    refit: float
    pruned: float

    @property
    def helps(self) -> bool:
        """Whether the refit predicts held-out rows better than the pruned weights do."""
        return self.refit < self.pruned


def choose_damping(stats: LayerStats, prior: np.ndarray, bias: bool, damping: float, seed: int = 0) -> Choice | None:
    """Cross-validated damping for one (ungrouped) layer, or None without two folds of statistics.

    Args:
        stats: The layer's statistics with its two ``folds`` (see onnx_ops.capture).
        prior: [k + 1, n] the pruned weights (last row: the bias); its zeros are kept.
        bias: Whether the bias is fit too.
        damping: The step's damping, the centre of the grid.
        seed: Seed of the sampled columns.
    """
    if len(stats.folds) != 2 or stats.xtx.ndim != 2:
        return None
    n = prior.shape[1]
    columns = np.sort(np.random.default_rng(seed).choice(n, min(n, _COLUMNS), replace=False))
    parts = [LayerStats(f.xtx, f.xty[:, columns], f.yty[columns], f.rows) for f in stats.folds]
    if any(p.rows == 0 for p in parts):
        return None
    sub = prior[:, columns]
    pruned = sum(p.squared_error(sub) for p in parts)
    grid = [damping * 10.0**j for j in range(-1, 4)] if damping > 0 else [0.0]
    scores = [sum(parts[1 - i].squared_error(solve_masked(parts[i], sub, bias, lam)) for i in range(2)) for lam in grid]
    best = int(np.argmin(scores))
    return Choice(grid[best], float(scores[best]), float(pruned))


def layer_choice(target: Linear, stats: LayerStats, damping: float) -> Choice | None:
    """choose_damping for a pruned layer as distill refits it (None for a grouped Conv, or without folds)."""
    if target.layer.groups != 1:
        return None
    prior = np.concatenate([target.matrices()[0], target.bias_rows()[0][None]], axis=0)
    return choose_damping(stats, prior, target.bias is not None and target.beta != 0.0, damping)
