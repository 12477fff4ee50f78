"""Sampled im2col: a Conv layer's input patches at a few output positions, so Conv is a matrix product there.

At one output position a Conv computes, for every group ``g``, ``y[g] = W_g @ patch[g] + b[g]``, where
``patch[g]`` is the group's input channels under the kernel window (with zeros where the window overhangs
the padding) flattened in the order of the weight ``[Cout, Cin/groups, *kernel]``, and ``W_g`` is that
group's slice of the weight reshaped to ``[Cout/groups, Cin/groups * prod(kernel)]``. Taking only a fixed
number of sampled positions per feed keeps the patch matrix small whatever the image size: its memory is
``positions * Cin * prod(kernel)`` values, not ``N * H_out * W_out`` times that. Any number of spatial
dimensions (Conv1d, Conv2d, Conv3d), pads, ``auto_pad``, strides, dilations and groups are handled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

__all__ = ["ConvGeometry", "outputs_at", "patches", "sample_positions"]


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """How a Conv slides its kernel, from its ONNX attributes and its weight's shape.

    Attributes:
        kernel: Kernel size per spatial dimension.
        strides: Step per spatial dimension.
        dilations: Spacing of kernel taps per spatial dimension.
        pads: Explicit padding, all begins then all ends (ONNX order); ignored unless auto_pad is NOTSET.
        auto_pad: NOTSET, VALID, SAME_UPPER or SAME_LOWER.
        groups: Channel groups (Cin and Cout are both split into this many).
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str = "NOTSET"
    groups: int = 1

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, object], weight_shape: tuple[int, ...]) -> ConvGeometry:
        """Geometry of a Conv with these attributes (name -> int, list of ints or str) and weight shape."""
        rank = len(weight_shape) - 2

        def ints(name: str, default: int) -> tuple[int, ...]:
            value = attributes.get(name)
            return tuple(int(v) for v in value) if isinstance(value, list | tuple) and value else (default,) * rank

        auto_pad = attributes.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        pads = ints("pads", 0) if attributes.get("pads") else (0,) * (2 * rank)
        groups = attributes.get("group", 1)
        return cls(
            kernel=tuple(int(k) for k in weight_shape[2:]),
            strides=ints("strides", 1),
            dilations=ints("dilations", 1),
            pads=pads,
            auto_pad=auto_pad or "NOTSET",
            groups=int(groups) if isinstance(groups, int | np.integer) else 1,
        )

    @property
    def taps(self) -> int:
        """Kernel taps per input channel: prod(kernel)."""
        return math.prod(self.kernel)

    def padding(self, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Padding at the begin and end of each spatial dimension for an input of this spatial shape."""
        rank = len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations, strict=True):
                out = -(-size // s)
                total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
                small, large = total // 2, total - total // 2
                begin.append(small if self.auto_pad == "SAME_UPPER" else large)
                end.append(large if self.auto_pad == "SAME_UPPER" else small)
            return tuple(begin), tuple(end)
        if self.auto_pad == "VALID":
            return (0,) * rank, (0,) * rank
        return self.pads[:rank], self.pads[rank:]

    def output_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial shape of the Conv's output for an input of this spatial shape."""
        begin, end = self.padding(spatial)
        return tuple(
            (size + b + e - (k - 1) * d - 1) // s + 1
            for size, b, e, k, s, d in zip(spatial, begin, end, self.kernel, self.strides, self.dilations, strict=True)
        )


def sample_positions(batch: int, spatial: tuple[int, ...], cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted flat indices into [batch, *spatial] output positions: all of them, or ``cap`` drawn without repeats."""
    total = batch * math.prod(spatial)
    if total <= cap:
        return np.arange(total)
    return np.sort(rng.choice(total, size=cap, replace=False))


def patches(x: np.ndarray, geometry: ConvGeometry, positions: np.ndarray) -> np.ndarray:
    """Input patches of a Conv at sampled output positions.

    Args:
        x: The Conv's input, [N, Cin, *spatial].
        geometry: The Conv's geometry.
        positions: Flat indices into [N, *output spatial shape] (see sample_positions).

    Returns:
        [P, groups, Cin/groups * prod(kernel)] patches; ``patches[:, g] @ W_g.T`` is the bias-free Conv
        output of group g's channels at those positions.
    """
    n, channels, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    out = geometry.output_shape(spatial)
    index = np.unravel_index(positions, (n, *out))
    begin, _ = geometry.padding(spatial)
    rank = len(spatial)
    count = len(positions)
    coords, valid = [], np.ones((count, *geometry.kernel), dtype=bool)
    for d in range(rank):
        taps = np.arange(geometry.kernel[d]) * geometry.dilations[d]
        c = index[1 + d][:, None] * geometry.strides[d] - begin[d] + taps[None, :]  # [P, k_d]
        shape = [count] + [1] * rank
        shape[1 + d] = geometry.kernel[d]
        c = c.reshape(shape)
        valid &= (c >= 0) & (c < spatial[d])
        coords.append(np.clip(c, 0, spatial[d] - 1))
    batch = index[0].reshape([count] + [1] * rank)
    moved = np.moveaxis(x, 1, -1)  # [N, *spatial, Cin]: one gather picks every channel of a tap
    gathered = moved[(batch, *coords)]  # [P, *kernel, Cin]
    gathered = np.where(valid[..., None], gathered, np.zeros((), x.dtype))
    grouped = np.moveaxis(gathered, -1, 1)  # [P, Cin, *kernel]
    return np.ascontiguousarray(grouped).reshape(count, geometry.groups, (channels // geometry.groups) * geometry.taps)


def outputs_at(y: np.ndarray, positions: np.ndarray, groups: int = 1) -> np.ndarray:
    """A Conv's output [N, Cout, *spatial] at sampled flat positions, as [P, groups, Cout/groups]."""
    channels = y.shape[1]
    flat = np.moveaxis(y, 1, -1).reshape(-1, channels)
    sampled: np.ndarray = flat[positions]
    return sampled.reshape(len(positions), groups, channels // groups)
