"""Distill's refit of a low-rank pair: both factors at once, by reduced-rank regression on the student's inputs.

svd rewrites a layer as ``(x @ A) @ B + bias``. Distill fits such a layer to its target (the teacher's layer
output or, with ``residual``, the teacher's sum minus the student's other addend) on the inputs the student
itself feeds it. Refitting B alone (A kept) is least squares on the r columns of ``x A``; refitting both is
the best rank-r map from x: reduced-rank regression, in closed form as activation-aware SVD solves it
(``_svd_aware.whiten``: the ridge solution whitened by the inputs' covariance, truncated to rank r, mapped
back). Its statistics are those of x (k inputs) rather than of ``x A`` (r).

Three candidates are scored by two-fold cross-validation over the calibration feeds (fit on one fold, squared
error on the other): the factors as they are, B refit given A, and both refit, each refit at the ridge term
among ``damping * 10^j`` (j = -1..2) that predicts best. The best is kept; without folds, both are refit at
``damping``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnx_ops.capture import LayerStats
from onnx_ops.passes._base import PassLog, constant_array, is_constant_weight, set_constant
from onnx_ops.passes._layers import Linear
from onnx_ops.passes._masked_solve import solve_masked
from onnx_ops.passes._svd_aware import whiten
from onnx_ops.report import LayerChange

__all__ = ["first_factor", "refit_pair", "widen"]


def first_factor(target: Linear) -> ir.Node | None:
    """The MatMul(x, A) whose output alone feeds the second factor `target`, or None when it is not one."""
    if target.node.op_type != "MatMul" or target.layer.conv is not None:
        return None
    between = target.node.inputs[0]
    first = between.producer() if between is not None else None
    if first is None or first.op_type != "MatMul" or first.domain not in ("", "ai.onnx") or len(first.inputs) != 2:
        return None
    x, a = first.inputs
    if x is None or not x.name or x.const_value is not None or not is_constant_weight(a) or a is None:
        return None
    array = constant_array(a)
    if array.ndim != 2 or array.dtype != np.float32 or len(between.uses()) != 1 or len(a.uses()) != 1:  # type: ignore[union-attr]
        return None
    return first


def widen(target: Linear, first: ir.Node) -> None:
    """Capture the pair's input x (k columns) for `target` instead of its first factor's output x A."""
    x, a = first.inputs
    assert x is not None and a is not None
    target.layer = dataclasses.replace(target.layer, input=x.name or "", k=int(constant_array(a).shape[0]))


def refit_pair(target: Linear, first: ir.Node, stats: LayerStats, damping: float, log: PassLog) -> int:
    """Refit B, or A and B, from the statistics of x against the target, where that predicts held-out feeds better.

    Args:
        target: The second factor (its node, weight B and bias), its layer widened (``widen``).
        first: The first factor's MatMul (weight A).
        stats: X^T X, X^T Y, Y^T Y of x, with two folds for cross-validation (or none).
        damping: The ridge term at the centre of the grid, relative to the mean of diag(X^T X).
        log: Where the change (or why the factors stay) is recorded.

    Returns:
        1 if the factors were refit, else 0.
    """
    assert first.inputs[1] is not None
    a = constant_array(first.inputs[1]).astype(np.float64)  # [k, r]
    b, bias = target.matrices()[0], target.bias_rows()[0]
    fit_bias = target.bias is not None and target.beta != 0.0
    rank = a.shape[1]
    current = np.vstack([a @ b, bias[None]])
    lift = np.zeros((a.shape[0] + 1, rank + 1))  # x A's statistics are lift^T X^T X lift, lift^T X^T Y
    lift[:-1, :-1], lift[-1, -1] = a, 1.0
    prior = np.vstack([b, bias[None]])

    def second(s: LayerStats, lam: float) -> np.ndarray:
        lifted = LayerStats(lift.T @ s.xtx @ lift, lift.T @ s.xty, s.yty, s.rows)
        weight: np.ndarray = lift @ solve_masked(lifted, prior, fit_bias, lam)
        return weight

    def both(s: LayerStats, lam: float) -> np.ndarray:
        a2, b2, bias2 = whiten(s, a @ b, fit_bias, lam, folds=False).factors(rank)
        return np.vstack([a2 @ b2, (bias if bias2 is None else bias2)[None]])

    grid = [damping * 10.0**j for j in range(-1, 3)] if damping > 0 else [0.0]
    folds = list(zip(stats.folds, stats.folds[::-1], strict=True)) if len(stats.folds) == 2 else []
    best = ("kept", sum(test.squared_error(current) for _, test in folds), damping) if folds else ("both", 0, damping)
    for name, fit in (("second", second), ("both", both)) if folds else ():
        for lam in grid:
            score = sum(test.squared_error(fit(train, lam)) for train, test in folds)
            if score < best[1]:
                best = (name, score, lam)
    reference = max(float(stats.yty.sum()), np.finfo(np.float64).tiny)
    if best[0] == "kept":
        log.skip(target.name, "no refit of the factors predicted held-out calibration feeds better")
        return 0
    before = stats.squared_error(current)
    if best[0] == "second":
        solved = solve_masked(LayerStats(lift.T @ stats.xtx @ lift, lift.T @ stats.xty, stats.yty), prior, fit_bias,
                              best[2])  # fmt: skip
        a_new, b_new, bias_new = a, solved[:-1], solved[-1]
    else:
        a_new, b_new, refit_bias = whiten(stats, a @ b, fit_bias, best[2], folds=False).factors(rank)
        bias_new = bias if refit_bias is None else refit_bias
    after = stats.squared_error(np.vstack([a_new @ b_new, bias_new[None]]))
    if not all(np.all(np.isfinite(v)) for v in (a_new, b_new, bias_new)):
        log.skip(target.name, "the refit of the factors is not finite")
        return 0
    set_constant(first.inputs[1], a_new.astype(np.float32))
    target.store(b_new[None], bias_new[None] if fit_bias else None)
    k, n = a.shape[0], b.shape[1]
    what = "both factors" if best[0] == "both" else "the second factor"
    log.layers.append(
        LayerChange(
            name=target.name,
            op_type=target.node.op_type,
            weight=target.weight.name or "?",
            shape_before=[k, rank, rank, n],
            shape_after=[k, rank, rank, n],
            params_before=rank * (k + n),
            params_after=rank * (k + n),
            rank=rank,
            note=f"{what} refit: layer output relative squared error {before / reference:.4g} -> "
            f"{after / reference:.4g} (level {target.level}, {stats.rows} rows)",
        )
    )
    return 1
