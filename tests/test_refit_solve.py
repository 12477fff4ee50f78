"""The chunked masked solves of distill's refit give the per-column float64 ridge solutions, up to round-off."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_ops.capture import LayerStats
from onnx_ops.passes import _masked_solve, _masks, _refit
from onnx_ops.passes._refit import solve_masked
from onnx_ops.pipeline import compress
from tests import models


def _reference(stats: LayerStats, prior: np.ndarray, bias: bool, damping: float) -> np.ndarray:
    """The slow definition: one dense solve per output column over the inputs it keeps."""
    k, n = prior.shape[0] - 1, prior.shape[1]
    diagonal = np.diag(stats.xtx)[:k]
    ridge = np.zeros(k + 1)
    ridge[:k] = max(damping * float(diagonal.mean()), 1e-12 * max(float(diagonal.max()), 1.0))
    gram = stats.xtx + np.diag(ridge)
    target = stats.xty + ridge[:, None] * prior
    result = np.zeros((k + 1, n))
    for j in range(n):
        rows = np.flatnonzero(prior[:-1, j] != 0)
        if bias:
            rows = np.append(rows, k)
        if rows.size:
            result[rows, j] = np.linalg.solve(gram[np.ix_(rows, rows)], target[rows, j])
    return result


def _stats(rng: np.random.Generator, k: int, n: int, rows: int = 300) -> LayerStats:
    mixing = rng.standard_normal((k, k)) * 0.3 + np.eye(k)  # correlated inputs, as activations are
    x = (rng.standard_normal((rows, k)) @ mixing).astype(np.float32)
    y = (x @ rng.standard_normal((k, n)) + rng.standard_normal((rows, n))).astype(np.float32)
    stats = LayerStats.empty(k, n)
    stats.add(x, y)
    return stats


def _prior(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    k, n = mask.shape
    prior = rng.standard_normal((k + 1, n))
    prior[:-1][~mask] = 0.0
    return prior


def _row_mask(rng: np.random.Generator, k: int, n: int, keep: int) -> np.ndarray:
    """Every column keeps exactly `keep` inputs (per-row exact-count pruning of the stored weight)."""
    mask = np.zeros((k, n), dtype=bool)
    for j in range(n):
        mask[rng.permutation(k)[:keep], j] = True
    return mask


def _mask_kinds(rng: np.random.Generator, k: int, n: int) -> dict[str, np.ndarray]:
    mixed = _row_mask(rng, k, n, k // 2)
    mixed[:, :5] = True  # unpruned columns: one shared solve
    mixed[:, 5:7] = False  # fully pruned columns: only the bias, or nothing
    mixed[:, 7:10] = mixed[:, [10]]  # a repeated pattern
    nm = np.zeros((k, n), dtype=bool)
    nm[0::4] = nm[1::4] = True  # 2:4 along the inputs, the same pattern in every column
    return {
        "per-row count": _row_mask(rng, k, n, k // 2),
        "unstructured": rng.random((k, n)) > 0.5,
        "mixed": mixed,
        "2:4": nm,
    }


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_solve_masked_equals_the_per_column_solve(bias: bool, damping: float) -> None:
    rng = np.random.default_rng(0)
    k, n = 40, 30
    stats = _stats(rng, k, n)
    for name, mask in _mask_kinds(rng, k, n).items():
        prior = _prior(rng, mask)
        expected = _reference(stats, prior, bias, damping)
        found = solve_masked(stats, prior, bias, damping)
        np.testing.assert_allclose(found, expected, rtol=1e-8, atol=1e-10, err_msg=name)
        assert np.all(found[:-1][~mask] == 0.0), name
        assert bias or np.all(found[-1] == 0.0), name


def test_solve_masked_in_chunks_of_one_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk cap below one sub-matrix still solves every column, one at a time."""
    rng = np.random.default_rng(1)
    k, n = 24, 17
    stats = _stats(rng, k, n)
    prior = _prior(rng, _row_mask(rng, k, n, 12))
    monkeypatch.setattr(_masked_solve, "_CHUNK_BYTES", 4 * 13 * 13 * 3)  # three 13 x 13 sub-matrices per chunk
    three = solve_masked(stats, prior, True, 0.01)
    monkeypatch.setattr(_masked_solve, "_CHUNK_BYTES", 1)
    one = solve_masked(stats, prior, True, 0.01)
    expected = _reference(stats, prior, True, 0.01)
    np.testing.assert_allclose(three, expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(one, expected, rtol=1e-8, atol=1e-10)


def test_solve_falls_back_when_the_matrix_is_not_positive_definite() -> None:
    indefinite = np.array([[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(_masked_solve._solve(indefinite, np.array([2.0, 3.0])), [3.0, 2.0])
    singular = np.array([[1.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(_masked_solve._solve(singular, np.array([2.0, 2.0])), [1.0, 1.0])


def test_solve_masked_falls_back_to_float64_on_an_ill_conditioned_layer() -> None:
    """Two inputs equal to 1e-7 and no damping: float32 cannot factor it; the float64 solve fits as well."""
    rng = np.random.default_rng(2)
    k, n, rows = 12, 9, 200
    x = rng.standard_normal((rows, k))
    x[:, 1] = x[:, 0] + 1e-7 * rng.standard_normal(rows)
    y = x @ rng.standard_normal((k, n)) + 0.1 * rng.standard_normal((rows, n))
    stats = LayerStats.empty(k, n)
    stats.xtx[:-1, :-1], stats.xtx[:-1, -1], stats.xtx[-1, :-1], stats.xtx[-1, -1] = x.T @ x, x.sum(0), x.sum(0), rows
    stats.xty[:-1], stats.xty[-1], stats.yty[:] = x.T @ y, y.sum(0), (y * y).sum(0)
    mask = _row_mask(rng, k, n, 8)
    mask[:2] = True  # every column keeps both of the near-equal inputs
    prior = _prior(rng, mask)
    found = solve_masked(stats, prior, True, 0.0)
    expected = _reference(stats, prior, True, 0.0)
    assert np.all(np.isfinite(found)) and np.all(found[:-1][~mask] == 0.0)
    error, best = stats.squared_error(found), stats.squared_error(expected)
    assert abs(error - best) <= 1e-9 * float(stats.yty.sum())


def test_distill_captures_in_bounded_runs_and_skips_a_layer_over_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """fc1's statistics (266 kB) pass a 200 kB cap: skipped with the reason; fc0 and fc2 refit in two runs."""
    monkeypatch.setattr(_refit, "_LAYER_BYTES", 200_000)
    monkeypatch.setattr(_masks, "_STATS_BYTES", 150_000)  # fc0 (101 kB) and fc2 (144 kB) in runs of their own
    model = models.mlp()
    rng = np.random.default_rng(3)
    # Correlated inputs (independent ones leave a refit of fc0 nothing to recover: distill's cross-validation
    # would rightly leave it as pruned).
    mix = rng.standard_normal((64, 64)) / 8
    data = {"x": (rng.standard_normal((64, 1, 64)) @ mix).astype(np.float32)}
    prune = {"kind": "prune", "sparsity": 0.5, "min_elements": 0}
    distill = {"kind": "distill", "min_elements": 0, "sequential": False}
    pruned = compress(model, {"steps": [prune]}, evaluation=data).model
    result = compress(model, {"steps": [prune, distill]}, calibration=data, evaluation=data)
    step = result.report.steps[1]
    assert [s.name for s in step.skipped] == ["fc1"] and "distill's cap" in step.skipped[0].reason
    assert step.summary["layers_refit"] == 2
    before, after = step.summary["model_rel_error_before"], step.summary["model_rel_error_after"]
    assert isinstance(before, float) and isinstance(after, float) and after < before
    old, new = ({t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (pruned, result.model))
    np.testing.assert_array_equal(old["W1"], new["W1"])
    assert not np.array_equal(old["W0"], new["W0"]) and not np.array_equal(old["W2"], new["W2"])
