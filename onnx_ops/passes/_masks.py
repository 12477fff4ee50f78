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

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from onnx_ops.capture import Layer, LayerStats, capture
from onnx_ops.passes._base import Feed
from onnx_ops.passes._layers import from_matrices, is_linear, linear, weight_matrices
from onnx_ops.plan import PruneStep

__all__ = ["Cut", "activation_norms", "activation_scores", "global_cut", "mask", "nm_mask", "row_mask", "smallest"]

_STATS_BYTES = 256 * 2**20  # statistics captured in one run over the calibration feeds


@dataclasses.dataclass
class Cut:
    """Zero what lies below a magnitude threshold, and the first `ties` entries equal to it (in weight order)."""

    threshold: np.float32
    ties: int

    def mask(self, magnitudes: np.ndarray) -> np.ndarray:
        """The mask of one weight's magnitudes (float32); uses up the ties it zeroes."""
        mask = magnitudes < self.threshold
        if self.ties > 0:
            equal = np.flatnonzero(magnitudes == self.threshold)[: self.ties]
            mask.flat[equal] = True
            self.ties -= equal.size
        return mask


def mask(
    step: PruneStep, array: np.ndarray, layout: tuple[ir.Node, int | None], score: np.ndarray | str, cut: Cut | None
) -> np.ndarray:
    """Boolean mask of the entries of one weight to zero.

    Args:
        step: The prune step (unstructured or n:m).
        array: The weight.
        layout: A node that uses it and the weight's input (reduction) axis.
        score: Its activation-aware scores, or a string (empty or a reason) to prune by magnitude.
        cut: The threshold over every weight (scope global, see global_cut).
    """
    node, axis = layout
    if step.method == "n:m":
        return nm_mask(array if isinstance(score, str) else score, axis or 0, step.n, step.m)
    if step.scope == "global":
        assert cut is not None
        return cut.mask(_magnitudes(array))
    if isinstance(score, str):
        return smallest(_magnitudes(array), step.sparsity)
    return row_mask(node, score, step.sparsity)


def smallest(magnitudes: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of exactly round(fraction * size) smallest entries; ties go to the first in flat order."""
    k = round(fraction * magnitudes.size)
    if k <= 0:
        return np.zeros(magnitudes.shape, dtype=bool)
    threshold = np.partition(magnitudes.ravel(), k - 1)[k - 1]  # one copy of the weight (no int64 indices)
    cut = Cut(threshold, 0)
    below = cut.mask(magnitudes)
    cut.ties = k - int(np.count_nonzero(below))
    return cut.mask(magnitudes)


def global_cut(arrays: Callable[[], Iterator[np.ndarray]], fraction: float) -> Cut:
    """The cut zeroing the round(fraction * total) smallest magnitudes over all arrays, read one at a time.

    An exact selection on the bits of the float32 magnitudes (which order like the magnitudes): a histogram of
    the high 16 bits over every array finds the bin holding the k-th smallest, a second pass over that bin's low
    16 bits finds the value. Two passes over the weights, one weight in memory at a time.
    """
    high = np.zeros(1 << 16, np.int64)
    total = 0
    for array in arrays():
        high += np.bincount((_magnitudes(array).view(np.uint32) >> 16).ravel(), minlength=1 << 16)
        total += array.size
    k = round(fraction * total)
    if k <= 0:
        return Cut(np.float32(-1.0), 0)
    count = np.cumsum(high)
    top = int(np.searchsorted(count, k))  # the first high bin reaching k entries
    before = int(count[top - 1]) if top else 0
    low = np.zeros(1 << 16, np.int64)
    for array in arrays():
        bits = _magnitudes(array).view(np.uint32).ravel()
        low += np.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
    count = before + np.cumsum(low)
    bottom = int(np.searchsorted(count, k))
    below = int(count[bottom - 1]) if bottom else before
    threshold = np.array([(top << 16) | bottom], np.uint32).view(np.float32)[0]
    return Cut(threshold, k - below)


def _magnitudes(array: np.ndarray) -> np.ndarray:
    magnitudes: np.ndarray = np.abs(array).astype(np.float32, copy=False)
    return magnitudes


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


def activation_norms(
    model: ir.Model,
    weights: Sequence[tuple[ir.Value, Sequence[ir.Node]]],
    feeds: Sequence[Feed],
    step: PruneStep,
    visit: Callable[[int, LayerStats], None] | None = None,
) -> list[np.ndarray | str]:
    """Per weight, the norms of its input features ([groups, k, 1]), or why it is pruned by magnitude.

    Args:
        model: The model before pruning (its own activations are captured).
        weights: Each weight with the nodes that use it.
        feeds: Calibration feeds.
        step: The prune step (its positions: Conv output positions sampled per feed).
        visit: Called with each captured weight's index and its full statistics (X^T X, X^T Y against the
            unpruned layer's outputs) before they are dropped, one capture chunk at a time.
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
            results[index] = stats[layer.name].input_norms().reshape(layer.groups, layer.k, 1)
            if visit is not None:
                visit(index, stats[layer.name])
        del stats
    return results


def activation_scores(node: ir.Node, stored: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """|W| times its input feature's norm (from activation_norms), in the weight's stored layout."""
    return from_matrices(node, np.abs(weight_matrices(node, stored)) * norms, stored.shape)


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
