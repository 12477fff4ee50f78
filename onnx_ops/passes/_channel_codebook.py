"""Per-output-channel k-means codebooks: each output channel of a weight clustered on its own.

One codebook per layer fits badly where channels differ in scale (the depthwise and first Conv layers of mobile
CNNs): a channel of small weights gets few of the centroids. Here each output channel gets its own k-means
(``_kmeans.kmeans_1d``) of at most 2^bits centroids. The codebooks are stored one after the other in one flat
table (a channel with fewer distinct values than 2^bits stores only those), with a table of each channel's offset
into it: ONNX Runtime decodes ``Gather(codebook, index + offset[channel])`` once, at load, like the layer codebook.

The output channel of each weight: a Conv's axis 0; a MatMul's last axis for its right operand (columns) and its
second to last for its left one (rows); a Gemm's by transA/transB; an embedding table's (Gather) last axis, the
hidden dimension (one codebook per vocabulary row would cost more than the table).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnx_ops.passes._kmeans import kmeans_1d

__all__ = ["ChannelClusters", "kmeans_channels", "output_axis"]


@dataclasses.dataclass(frozen=True)
class ChannelClusters:
    """Every channel's codebook, in one flat table, and each value's index within its channel's codebook.

    Attributes:
        codebook: The channels' centroids one after the other, float32.
        offsets: Where each channel's centroids start in `codebook`, int32, shaped to broadcast along the weight's
            channel axis (1 on every other axis).
        indices: Each value's index into its channel's centroids, uint8, the weight's shape.
    """

    codebook: np.ndarray
    offsets: np.ndarray
    indices: np.ndarray

    def restored(self) -> np.ndarray:
        """The clustered weight, as ONNX Runtime decodes it."""
        restored: np.ndarray = self.codebook[self.indices.astype(np.int64) + self.offsets]
        return restored


def output_axis(node: ir.Node, index: int, rank: int) -> int:
    """The axis of the output channels of the weight that is input `index` of `node` (of `rank` dimensions)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        transposed = node.attributes.get_int("transB" if index == 1 else "transA", 0)
        return (0 if transposed else 1) if index == 1 else (1 if transposed else 0)
    if node.op_type == "MatMul":
        return rank - 1 if index == 1 else rank - 2
    return rank - 1  # Gather: the hidden dimension of an embedding table


def kmeans_channels(
    values: np.ndarray,
    axis: int,
    k: int,
    *,
    init: Literal["quantile", "kmeans++"] = "quantile",
    iterations: int = 12,
    pin_zero: bool = False,
    seed: int = 0,
) -> ChannelClusters:
    """Cluster each slice of `values` along `axis` into at most k (<= 256) centroids (see ``kmeans_1d``)."""
    moved = np.moveaxis(np.asarray(values, np.float32), axis, 0)
    books: list[np.ndarray] = []
    starts = np.zeros(moved.shape[0], np.int32)
    indices = np.empty(moved.shape, np.uint8)
    start = 0
    for channel, row in enumerate(moved):
        found = kmeans_1d(row, k, init=init, iterations=iterations, pin_zero=pin_zero, seed=seed + channel)
        books.append(found.codebook)
        indices[channel] = found.indices.reshape(row.shape)
        starts[channel], start = start, start + found.codebook.size
    shape = [1] * moved.ndim
    shape[axis] = moved.shape[0]
    return ChannelClusters(
        codebook=np.concatenate(books).astype(np.float32),
        offsets=starts.reshape(shape),
        indices=np.ascontiguousarray(np.moveaxis(indices, 0, axis)),
    )
