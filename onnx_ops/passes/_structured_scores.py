"""Which channels structured pruning removes: by their contribution to the consumers' outputs, or by magnitude.

With calibration data, a channel's score is the energy it sends into the layers that consume it,
``sum over consumers of ||x_c||^2 * ||W_consumer[:, c]||^2``, where x_c is the channel as the consumer
sees it (after activations, normalization, pooling or a depthwise Conv) on the calibration inputs of the
original model, and W_consumer[:, c] the consumer's weights that read it. A channel with large weights that
is rarely active scores low, and a small-weight channel that the consumer amplifies scores high. Without
calibration data the producer's own weight norm decides (``_structured.choose_removed``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_ops.capture import Session
from onnx_ops.passes._base import Feed, constant_array
from onnx_ops.passes._structured import Trace, choose_removed

__all__ = ["channel_energy", "removed_channels"]


def channel_energy(model: ir.Model, traces: Sequence[Trace], feeds: Sequence[Feed]) -> dict[str, np.ndarray]:
    """Sum over the calibration feeds of x_c^2 per channel of every consumer input, by value name.

    Run once on the model before any channel is removed; names do not change when channels are.
    """
    axes: dict[str, int] = {}
    for found in traces:
        channel_axes = {value.name: axis for value, axis in found.values if axis is not None}
        for node, _, _ in found.consumers:
            name = node.inputs[0].name if node.inputs[0] is not None else None
            if name and name in channel_axes:
                axes[name] = channel_axes[name]
    if not axes or not feeds:
        return {}
    session = Session(ir.to_proto(model), axes)
    energy: dict[str, np.ndarray] = {}
    for feed in feeds:
        outputs = session.run(feed)
        for name, axis in axes.items():
            x = np.moveaxis(outputs[name].astype(np.float64), axis, -1)
            squares = np.square(x).reshape(-1, x.shape[-1]).sum(axis=0)
            energy[name] = energy[name] + squares if name in energy else squares
    return energy


def removed_channels(found: Trace, count: int, norm: str, energy: dict[str, np.ndarray] | None) -> np.ndarray:
    """Sorted indices of the ``count`` channels to remove: least energy sent to the consumers, else least norm."""
    if energy:
        scores = np.zeros(found.channels)
        for node, weight, axis in found.consumers:
            value = node.inputs[0]
            x = energy.get(value.name or "") if value is not None else None
            if x is None or x.shape != (found.channels,):
                break  # this consumer's input was not measured: fall back to magnitude for the whole trace
            rows = np.moveaxis(constant_array(weight), axis, 0).reshape(found.channels, -1).astype(np.float64)
            scores += x * np.einsum("ij,ij->i", rows, rows)
        else:
            return np.sort(np.argsort(scores, kind="stable")[:count])
    return choose_removed(constant_array(found.weight), found.axis, count, norm)
