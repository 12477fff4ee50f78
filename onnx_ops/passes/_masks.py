"""Which weights unstructured and N:M pruning remove: by magnitude, or by magnitude times the input's norm.

* magnitude: ``|W|`` compared within each tensor, over all tensors (global) or in groups of m (N:M).
* activation (Wanda, Sun et al. 2023): ``|W_ij| * ||x_j||``, with ``||x_j||`` the L2 norm of input feature j
  over the calibration data, captured on the unpruned model (``onnx_ops.capture``; a Conv's features are
  its im2col patch entries). A weight that multiplies a large input matters more than its size says.
  Unstructured pruning compares the scores within each output row (the weights that feed one output), as
  Wanda does; N:M compares them in its groups of m. MatMul (2-D weight), Gemm and Conv weights get scores;
  any other weight is pruned by magnitude and the log says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_ops.capture import Layer, capture
from onnx_ops.passes._base import Feed
from onnx_ops.passes._layers import from_matrices, is_linear, linear, weight_matrices
from onnx_ops.plan import PruneStep

__all__ = ["activation_scores", "global_masks", "masks", "nm_mask", "row_mask", "smallest"]

_STATS_BYTES = 256 * 2**20  # statistics captured in one run over the calibration feeds


def masks(
    step: PruneStep,
    arrays: Sequence[np.ndarray],
    layouts: Sequence[tuple[ir.Node, int | None]],
    scores: Sequence[np.ndarray | str],
) -> list[np.ndarray]:
    """Boolean masks of the entries to zero, one per weight.

    Args:
        step: The prune step (unstructured or n:m).
        arrays: The weights.
        layouts: Per weight, a node that uses it and the weight's input (reduction) axis.
        scores: Per weight, its activation-aware scores, or a string (empty or a reason) to prune by magnitude.
    """
    rows = zip(arrays, layouts, scores, strict=True)
    if step.method == "n:m":
        return [nm_mask(a if isinstance(s, str) else s, axis or 0, step.n, step.m) for a, (_, axis), s in rows]
    if step.scope == "global":
        return global_masks(list(arrays), step.sparsity)
    return [
        smallest(np.abs(a).ravel(), step.sparsity).reshape(a.shape)
        if isinstance(s, str)
        else row_mask(node, s, step.sparsity)
        for a, (node, _), s in rows
    ]


def smallest(magnitudes: np.ndarray, fraction: float) -> np.ndarray:
    """Flat mask of exactly round(fraction * size) smallest entries; ties are broken arbitrarily."""
    k = round(fraction * magnitudes.size)
    mask = np.zeros(magnitudes.size, dtype=bool)
    if k > 0:
        mask[np.argpartition(magnitudes, k - 1)[:k]] = True
    return mask


def global_masks(arrays: list[np.ndarray], fraction: float) -> list[np.ndarray]:
    """Masks of the round(fraction * total) smallest magnitudes over all arrays together."""
    if not arrays:
        return []
    flat = np.concatenate([np.abs(a).ravel().astype(np.float32) for a in arrays])
    pieces = np.split(smallest(flat, fraction), np.cumsum([a.size for a in arrays])[:-1])
    return [p.reshape(a.shape) for p, a in zip(pieces, arrays, strict=True)]


def nm_mask(array: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Mask of the m - n smallest entries in each group of m consecutive entries along ``axis``."""
    moved = np.moveaxis(array, axis, -1)
    groups = np.abs(moved).reshape(-1, m)
    drop = np.argpartition(groups, m - n - 1, axis=1)[:, : m - n]
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, drop, True, axis=1)
    return np.moveaxis(mask.reshape(moved.shape), -1, axis)


def row_mask(node: ir.Node, scores: np.ndarray, fraction: float) -> np.ndarray:
    """Mask (stored layout) of the round(fraction * k) lowest scores among the k weights of each output."""
    matrices = weight_matrices(node, scores)  # [groups, k, n]
    drop = round(fraction * matrices.shape[1])
    mask = np.zeros(matrices.shape, dtype=bool)
    if drop > 0:
        lowest = np.argpartition(matrices, drop - 1, axis=1)[:, :drop, :]
        np.put_along_axis(mask, lowest, True, axis=1)
    return from_matrices(node, mask, scores.shape)


def activation_scores(
    model: ir.Model, weights: Sequence[tuple[ir.Value, Sequence[ir.Node]]], feeds: Sequence[Feed], step: PruneStep
) -> list[np.ndarray | str]:
    """|W| times its input feature's norm, in the weight's stored layout, or why it is pruned by magnitude.

    Args:
        model: The model before pruning (its own activations are captured).
        weights: Each weight with the nodes that use it.
        feeds: Calibration feeds.
        step: The prune step (its positions: Conv output positions sampled per feed).
    """
    layers: dict[int, Layer] = {}
    results: list[np.ndarray | str] = []
    for index, (_, nodes) in enumerate(weights):
        reason = _reason(nodes)
        if reason is None:
            found = linear(nodes[0])
            if isinstance(found, str):
                reason = found
            else:
                layers[index] = Layer(
                    name=str(index),
                    input=found.layer.input,
                    output=nodes[0].outputs[0].name or "",
                    k=found.layer.k,
                    n=found.layer.n,
                    conv=found.layer.conv,
                )
        results.append(reason or "")
    proto = ir.to_proto(model)
    for chunk in _chunks(list(layers.values())):
        stats, _ = capture(proto, None, chunk, feeds, positions=step.positions)
        for layer in chunk:
            index = int(layer.name)
            weight, nodes = weights[index]
            assert weight.const_value is not None
            stored = weight.const_value.numpy()
            norms = stats[layer.name].input_norms().reshape(layer.groups, layer.k, 1)
            scores = np.abs(weight_matrices(nodes[0], stored)) * norms
            results[index] = from_matrices(nodes[0], scores, stored.shape)
    return results


def _reason(nodes: Sequence[ir.Node]) -> str | None:
    if len(nodes) > 1:
        return f"the weight is shared by {len(nodes)} nodes"
    if not is_linear(nodes[0]):
        return f"{nodes[0].op_type} inputs are not captured (only MatMul with a 2-D weight, Gemm and Conv are)"
    return None


def _chunks(layers: list[Layer]) -> list[list[Layer]]:
    """Layers in runs whose statistics stay under _STATS_BYTES together (one run over the feeds each)."""
    chunks: list[list[Layer]] = []
    size = _STATS_BYTES
    for layer in layers:
        need = 8 * layer.groups * (layer.k + 1) * (layer.k + 2 + layer.n)
        if size + need > _STATS_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(layer)
        size += need
    return chunks
