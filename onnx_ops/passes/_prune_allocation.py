"""Per-layer sparsity for unstructured pruning that keeps the overall fraction of the pruned weights.

``allocation`` on a prune step (unstructured, per tensor, criterion activation) gives each layer its own
sparsity within ``sparsity +- allocation_range``, weighted by layer size so that the weights pruned over all
the layers that get activation-aware scores are the same fraction as with one sparsity everywhere:

* owl (outlier-weighted layer-wise sparsity, Yin et al. 2023): a layer's outlier ratio is the share of its
  scores |W_ij| * ||x_j|| above 5 times their mean; the layer with the most outliers gets the lowest sparsity,
  the one with the fewest the highest, linearly in between.
* measured: per layer, the layer's output error on the calibration data after a ridge refit of its kept
  weights (what ``distill`` does) at sparsities in steps of 0.05 over the range, times how much that layer's
  output error moves the model's outputs (the model's output error with this layer alone pruned at
  ``sparsity``, over the layer's own error at that mask: one run of the model over the calibration data per
  layer). Then, greedily, the next 0.05 of sparsity goes to the layer whose estimated model error grows
  slowest per weight pruned, until the overall fraction is reached (the last step in part).

The layers are scored one capture chunk at a time (``_masks.layer_stats``), so only one chunk's X^T X is held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_ops.capture import LayerStats, Session, output_error
from onnx_ops.passes import _masks
from onnx_ops.passes._base import Feed, constant_array, set_constant
from onnx_ops.passes._layers import from_matrices, weight_matrices
from onnx_ops.passes._masked_solve import solve_masked
from onnx_ops.plan import PruneStep

__all__ = ["allocate", "balance", "bounds", "greedy", "levels", "outlier_ratio", "owl"]

_OUTLIER = 5.0  # OWL's M: a score above M times the layer's mean score is an outlier
_STEP = 0.05  # sparsity grid of the measured curves
_DAMPING = 0.01  # the distill step's default ridge term


def allocate(
    model: ir.Model, weights: Sequence[tuple[ir.Value, Sequence[ir.Node]]], feeds: Sequence[Feed], step: PruneStep
) -> tuple[list[np.ndarray | str], list[float], dict[str, Any]]:
    """Activation norms (as _masks.activation_norms), each weight's sparsity, and what the log should say.

    Weights pruned by magnitude (a reason instead of norms) keep step.sparsity and take no part.
    """
    grid = levels(step)
    ratios: dict[int, float] = {}
    curves: dict[int, tuple[np.ndarray, float]] = {}

    def visit(index: int, stats: LayerStats) -> None:
        weight, nodes = weights[index]
        norms = stats.input_norms().reshape(stats.groups, -1, 1)
        if step.allocation == "owl":
            ratios[index] = outlier_ratio(np.abs(weight_matrices(nodes[0], constant_array(weight))) * norms)
        else:
            curves[index] = _refit_curve(nodes[0], constant_array(weight), norms, stats, grid)

    teacher = Session(model, []) if step.allocation == "measured" else None  # the unpruned model
    norms = _masks.activation_norms(model, weights, feeds, step, visit)
    scored = [i for i, n in enumerate(norms) if not isinstance(n, str)]
    sizes = [int(constant_array(weights[i][0]).size) for i in scored]
    sparsities = [step.sparsity] * len(weights)
    if not scored:
        return norms, sparsities, {}
    names = [weights[i][1][0].name or weights[i][0].name or "?" for i in scored]
    if step.allocation == "owl":
        chosen = owl(sizes, [ratios[i] for i in scored], step)
        basis = {"outlier_ratio": [f"{n}: {ratios[i]:.4g}" for n, i in zip(names, scored, strict=True)]}
    else:
        assert teacher is not None
        alone = []  # the model's output error with only this layer masked at the middle level
        for i in scored:
            norm = norms[i]
            assert not isinstance(norm, str)
            alone.append(_sensitivity(model, teacher, weights[i], norm, float(grid[grid.size // 2]), feeds))
        factors = [a / curves[i][1] if curves[i][1] > 0 else 0.0 for a, i in zip(alone, scored, strict=True)]
        chosen = greedy(sizes, [curves[i][0] * f for i, f in zip(scored, factors, strict=True)], grid, step.sparsity)
        basis = {
            "model_error_alone": [f"{n}: {a:.4g}" for n, a in zip(names, alone, strict=True)],
            "layer_error_refit": [
                f"{n}: " + " ".join(f"{e:.3g}" for e in curves[i][0]) for n, i in zip(names, scored, strict=True)
            ],
        }
    shapes = [weight_matrices(weights[i][1][0], constant_array(weights[i][0])).shape for i in scored]
    chosen = whole_rows([(g * n, k) for g, k, n in shapes], chosen, step)
    for i, s in zip(scored, chosen, strict=True):
        sparsities[i] = s
    mean = float(np.dot(sizes, chosen) / sum(sizes))
    summary: dict[str, Any] = {"allocation": step.allocation, "allocated_mean_sparsity": round(mean, 6), **basis}
    summary["layer_sparsity"] = [f"{n}: {s:.4f}" for n, s in zip(names, chosen, strict=True)]
    return norms, sparsities, summary


def whole_rows(layouts: Sequence[tuple[int, int]], chosen: Sequence[float], step: PruneStep) -> list[float]:
    """Sparsities that prune a whole number of weights in every row and step.sparsity of all of them.

    Each layer prunes the same count d of the k weights of each of its rows (``_masks.row_mask``), so a
    sparsity becomes d / k. The counts are rounded, then the layers with the most rows the remainder still
    covers take one more (or one fewer) per row until what is left is smaller than any layer's rows.

    Args:
        layouts: Each layer's (rows, k): rows = groups * outputs, k = inputs per row.
        chosen: The allocated sparsities.
        step: The prune step (sparsity and bounds).
    """
    low, high = bounds(step)
    counts = [round(s * k) for s, (_, k) in zip(chosen, layouts, strict=True)]
    budget = round(step.sparsity * sum(r * k for r, k in layouts))
    left = budget - sum(c * r for c, (r, _) in zip(counts, layouts, strict=True))
    while left:
        sign = 1 if left > 0 else -1
        fits = [
            j
            for j, (rows, k) in enumerate(layouts)
            if rows <= abs(left) and low * k <= counts[j] + sign <= high * k and 0 <= counts[j] + sign <= k
        ]
        if not fits:
            break
        j = max(fits, key=lambda j: (layouts[j][0], -j))
        counts[j] += sign
        left -= sign * layouts[j][0]
    return [c / k for c, (_, k) in zip(counts, layouts, strict=True)]


def levels(step: PruneStep) -> np.ndarray:
    """The sparsities the measured curves are taken at: the step's range in steps of _STEP, bounds included."""
    low, high = bounds(step)
    grid: np.ndarray = np.linspace(low, high, max(1, round((high - low) / _STEP)) + 1)
    return grid


def bounds(step: PruneStep) -> tuple[float, float]:
    """The lowest and highest sparsity a layer may get."""
    return max(0.0, step.sparsity - step.allocation_range), min(0.99, step.sparsity + step.allocation_range)


def outlier_ratio(scores: np.ndarray) -> float:
    """The share of scores above _OUTLIER times their mean."""
    mean = float(scores.mean()) if scores.size else 0.0
    return float(np.count_nonzero(scores > _OUTLIER * mean) / scores.size) if mean > 0 else 0.0


def owl(sizes: Sequence[int], ratios: Sequence[float], step: PruneStep) -> list[float]:
    """OWL sparsities: the most outliers get the lowest, the fewest the highest, then balanced (see balance)."""
    r = np.asarray(ratios, np.float64)
    spread = float(r.max() - r.min()) if r.size else 0.0
    if spread <= 0:
        return [step.sparsity] * len(sizes)
    return balance(sizes, step.sparsity + step.allocation_range * (1 - 2 * (r - r.min()) / spread), step)


def balance(sizes: Sequence[int], raw: np.ndarray, step: PruneStep) -> list[float]:
    """Shift raw sparsities by one offset (clipped to bounds) so their size-weighted mean is step.sparsity."""
    low, high = bounds(step)
    weights = np.asarray(sizes, np.float64) / max(sum(sizes), 1)
    lo, hi = -1.0, 1.0
    for _ in range(60):  # bisection: the mean is monotone in the offset
        mid = (lo + hi) / 2
        if float(np.sum(weights * np.clip(raw + mid, low, high))) < step.sparsity:
            lo = mid
        else:
            hi = mid
    return [float(s) for s in np.clip(raw + (lo + hi) / 2, low, high)]


def greedy(sizes: Sequence[int], curves: Sequence[np.ndarray], grid: np.ndarray, sparsity: float) -> list[float]:
    """Sparsities on the curves (error at each grid level, linear in between) whose size-weighted mean is sparsity.

    Every layer starts at grid[0]; the segment with the lowest error increase per pruned weight among each
    layer's next one is taken until the budget is spent (the last one in part).
    """
    size = np.asarray(sizes, np.float64)
    budget = (sparsity - float(grid[0])) * size.sum()
    at = [0] * len(sizes)
    result = [float(grid[0])] * len(sizes)
    while budget > 1e-9 * size.sum():
        open_ = [j for j in range(len(sizes)) if at[j] + 1 < grid.size]
        if not open_:
            break
        j = min(open_, key=lambda j: (float(curves[j][at[j] + 1] - curves[j][at[j]]) / size[j], j))
        width = float(grid[at[j] + 1] - grid[at[j]])
        take = min(1.0, budget / (size[j] * width))
        result[j] = float(grid[at[j]]) + take * width
        budget -= take * size[j] * width
        at[j] += 1
    return result


def _masked(node: ir.Node, stored: np.ndarray, norms: np.ndarray, fraction: float) -> np.ndarray:
    """The activation-aware row mask (as _masks.row_mask) as [groups, k, n]."""
    scores = _masks.activation_scores(node, stored, norms)
    mask: np.ndarray = weight_matrices(node, _masks.row_mask(node, scores, fraction))
    return mask


def _refit_curve(
    node: ir.Node, stored: np.ndarray, norms: np.ndarray, stats: LayerStats, grid: np.ndarray
) -> tuple[np.ndarray, float]:
    """The layer's relative output error after a ridge refit of its kept weights at each grid level.

    Returns:
        The refit errors per grid level, and the error of the plain mask (no refit) at the middle level.
    """
    matrices = weight_matrices(node, stored).astype(np.float64)  # [g, k, n]
    reference = max(float(stats.yty.sum()), np.finfo(np.float64).tiny)
    errors, plain = [], 0.0
    for index, level in enumerate(grid):
        mask = _masked(node, stored, norms, float(level))
        total = 0.0
        for g in range(matrices.shape[0]):
            one = stats.group(g)
            prior = np.vstack([np.where(mask[g], 0.0, matrices[g]), np.zeros((1, matrices.shape[2]))])
            total += one.squared_error(solve_masked(one, prior, True, _DAMPING))
            if index == grid.size // 2:
                removed = np.where(mask[g], matrices[g], 0.0)
                plain += float(np.sum(removed * (one.xtx[:-1, :-1] @ removed)))
        errors.append(total / reference)
    return np.asarray(errors), plain / reference


def _sensitivity(
    model: ir.Model,
    teacher: Session,
    weight: tuple[ir.Value, Sequence[ir.Node]],
    norms: np.ndarray,
    level: float,
    feeds: Sequence[Feed],
) -> float:
    """The model's output relative squared error with this one weight masked at ``level`` (then restored)."""
    value, nodes = weight
    original = constant_array(value)
    mask = from_matrices(nodes[0], _masked(nodes[0], original, norms, level), original.shape)
    set_constant(value, np.where(mask, np.zeros((), original.dtype), original))
    try:
        return output_error(teacher, model, feeds).relative
    finally:
        set_constant(value, original)
