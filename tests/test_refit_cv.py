"""Ridge terms chosen by two-fold cross-validation: distill's masked refit and activation-aware SVD's whitening."""

from __future__ import annotations

import numpy as np

from onnx_ops.capture import LayerStats
from onnx_ops.passes._refit import solve_masked
from onnx_ops.passes._refit_cv import choose_damping
from onnx_ops.passes._svd_aware import whiten


def _stats(x: np.ndarray, y: np.ndarray, folds: int = 2) -> LayerStats:
    """Statistics of rows split in folds (row i in fold i % folds), as capture(..., folds=2) keeps them."""
    parts = []
    for fold in range(folds):
        part = LayerStats.empty(x.shape[1], y.shape[1])
        part.add(x[fold::folds], y[fold::folds])
        parts.append(part)
    return LayerStats.merged(parts)


def _problem(rows: int, seed: int, k: int = 48, n: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlated inputs (12 latent directions plus noise), the teacher's outputs with noise: rows, held-out rows."""
    mixing = np.random.default_rng(2).standard_normal((12, k))
    teacher = np.random.default_rng(1).standard_normal((k, n))

    def data(count: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng([seed, stream])
        x = r.standard_normal((count, 12)) @ mixing + 0.1 * r.standard_normal((count, k))
        return x, x @ teacher + 0.5 * r.standard_normal((count, n))

    x, y = data(rows, 0)
    held_x, held_y = data(4000, 1)
    return x, y, np.hstack([held_x, held_y])


def test_few_rows_get_a_larger_damping_that_predicts_held_out_rows_better() -> None:
    x, y, held = _problem(rows=40, seed=3)
    stats = _stats(x, y)
    k = x.shape[1]
    teacher = np.random.default_rng(1).standard_normal((k, y.shape[1]))
    prior = np.vstack([np.where(np.abs(teacher) > 0.7, teacher, 0.0), np.zeros((1, y.shape[1]))])
    choice = choose_damping(stats, prior, bias=True, damping=1e-4)
    assert choice is not None and choice.damping > 1e-4 and choice.helps
    test = _stats(held[:, :k], held[:, k:], folds=1)
    chosen, default = (test.squared_error(solve_masked(stats, prior, True, d)) for d in (choice.damping, 1e-4))
    assert chosen < 0.9 * default
    assert choose_damping(_stats(x, y, folds=1), prior, True, 1e-4) is None  # no folds: the step's damping


def test_svd_factors_take_the_cross_validated_damping_of_their_rank() -> None:
    x, y, held = _problem(rows=50, seed=4)
    k = x.shape[1]
    w = np.random.default_rng(1).standard_normal((k, y.shape[1]))
    test = _stats(held[:, :k], held[:, k:], folds=1)

    def held_out(problem_folds: LayerStats) -> float:
        a, b, bias = whiten(problem_folds, w, True, 0.0001).factors(12)
        assert bias is not None
        return test.squared_error(np.vstack([a @ b, bias[None]]))

    cross_validated, fixed = held_out(_stats(x, y)), held_out(_stats(x, y, folds=1))
    problem = whiten(_stats(x, y), w, True, 0.0001)
    assert problem.cross_validated(12) is not None and problem.cross_validated(12) > 0.0001  # type: ignore[operator]
    assert cross_validated < 0.95 * fixed
