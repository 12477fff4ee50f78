"""Closed-form refit of one pruned linear layer from its captured statistics (ridge least squares, mask kept).

For every output column j of every group, the weights pruning kept are refit:
``w_j[m_j] = (X_m^T X_m + lambda I)^-1 (X_m^T y_j + lambda w_j_pruned)`` with X the student's layer inputs
(MatMul/Gemm rows, or a Conv's sampled im2col patches), y_j the teacher's layer output and m_j the
column's kept inputs. Zeros stay zero, so unstructured and N:M patterns are kept exactly; the bias, when
the layer has one, is fit with the weights and not damped.
"""

from __future__ import annotations

import numpy as np

from onnx_ops.capture import LayerStats
from onnx_ops.passes._base import PassLog
from onnx_ops.passes._layers import Linear
from onnx_ops.passes._masked_solve import solve_masked
from onnx_ops.passes._masks import _chunks
from onnx_ops.report import LayerChange

__all__ = ["refit", "runs", "solve_masked"]

_LAYER_BYTES = 512 * 2**20  # X^T X and X^T Y of one layer; a layer that needs more is left as pruning left it


def runs(targets: list[Linear], log: PassLog) -> list[list[Linear]]:
    """The targets in capture runs whose statistics stay under the 256 MB of the masks' runs together.

    A layer whose own statistics (float64, about 8 * (k + 1) * (k + n) bytes per group) would pass
    _LAYER_BYTES is skipped with the reason in the log: its solve would need several times as much again.
    """
    kept = []
    for target in targets:
        layer = target.layer
        need = 8 * layer.groups * (layer.k + 1) * (layer.k + 2 + layer.n)
        if need > _LAYER_BYTES:
            limit = _LAYER_BYTES // 2**20
            log.skip(layer.name, f"its X^T X and X^T Y would take {need / 2**20:.0f} MB (distill's cap: {limit} MB)")
        else:
            kept.append(target)
    order = iter(kept)
    return [[next(order) for _ in chunk] for chunk in _chunks([t.layer for t in kept])]


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
