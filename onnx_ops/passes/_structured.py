"""Structured pruning: trace a layer's output channels to the consumers that can be shrunk with it.

A producer (MatMul, Gemm or group-1 Conv with a constant weight) owns a set of output channels.
``trace`` follows its output through nodes that act on each channel independently until it reaches
consumers whose weight has a matching input dimension. Only when every use of every value on that
path is understood can the channels be removed; otherwise ``trace`` returns the reason it stopped.

Followed: Add/Sub/Mul/Div/PRelu with a constant that is scalar or broadcasts along the channel axis
(sliced when it has one entry per channel) or with another value of the same trace (x * sigmoid(x)),
BatchNormalization, channel-wise unary ops (activations, Clip with constant bounds, Dropout,
Identity, Cast), Max/Average/Lp pools and their global forms, Flatten(axis=1) after a global pool,
and depthwise Conv (group = channels, one output per channel: sliced with the channels, its group
updated). A Mul whose other operand is the per-channel output of another layer (the gate of a
squeeze-and-excitation block: Conv -> HardSigmoid -> Mul) is followed too: that layer's output
channels are removed with the same indices (a "mirror").
Consumers: MatMul with a 2-D constant weight, Gemm (transA=0), Conv with group=1.
Refused: graph outputs, Concat/Reshape/Transpose/Shape/LayerNormalization/Softmax and any other op,
operands from other activations (residual Add), grouped Conv other than depthwise, shared weights or
constants, excluded nodes, and anything inside subgraphs.

``apply`` records, on every tensor it slices, which of the original indices it kept along each axis
(``value.meta[KEPT]``: axis -> indices), so a later step (the structured refit of ``distill``) can compare a
layer's outputs with the same channels of the original model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_ops.passes._base import constant_array, set_constant
from onnx_ops.passes._structured_ops import BINARY, KEPT, PRODUCERS, State, Trace, follow, mirror, start

__all__ = ["KEPT", "PRODUCERS", "Trace", "apply", "choose_removed", "removed_count", "trace"]


def trace(node: ir.Node, exclude: set[str]) -> Trace | str:
    """Find everything that shrinks with the output channels of ``node``, or say why it cannot be done."""
    seed = start(node)
    if isinstance(seed, str):
        return seed
    result, state = seed
    pending: list[tuple[ir.Node, ir.Value]] = []
    states: dict[ir.Value, State] = {node.outputs[0]: state}
    queue = [node.outputs[0]]
    visited: set[ir.Node] = set()
    while queue:
        value = queue.pop()
        result.values.append((value, states[value].axis))
        if value.is_graph_output():
            return f"output {value.name!r} reaches a graph output"
        for use in value.uses():
            user, index = use.node, use.idx
            if user in visited and user.op_type in BINARY:
                continue
            step = follow(user, index, states[value], result, exclude, pending)
            if isinstance(step, str):
                return step
            visited.add(user)
            for out, out_state in step:
                if out not in states:
                    states[out] = out_state
                    queue.append(out)
    for user, other in pending:
        mul = user.op_type == "Mul"
        if mul and other not in states and mirror(other, states[user.outputs[0]], result, exclude, states):
            continue
        if other not in states or states[other].axis != states[user.outputs[0]].axis:
            residual = " (residual)" if user.op_type == "Add" else ""
            return f"output feeds {user.op_type} {user.name!r} with another activation{residual}"
    if not result.consumers:
        return "no consumer whose weight can be shrunk"
    return result


def removed_count(channels: int, sparsity: float, multiple: int = 1) -> int:
    """How many of ``channels`` to remove: floor(sparsity * C), at least one kept.

    With ``multiple`` > 1 and C a multiple of it, the count is rounded so that the kept channels are a
    (non-zero) multiple too: ONNX Runtime's fast blocked Conv kernels (NCHWc) take 8 or 16 channels at a
    time, and a Conv left with, say, 13 channels falls back to a kernel that is slower than the unpruned one.
    """
    count = min(int(np.floor(sparsity * channels + 1e-9)), channels - 1)
    if multiple > 1 and channels % multiple == 0:
        count = channels - max(multiple, int(np.floor((channels - count) / multiple + 0.5)) * multiple)
    return count


def choose_removed(weight: np.ndarray, axis: int, count: int, norm: str) -> np.ndarray:
    """Indices of the ``count`` output channels with the smallest norm."""
    channels = weight.shape[axis]
    rows = np.moveaxis(weight, axis, 0).reshape(channels, -1).astype(np.float64)
    scores = np.abs(rows).sum(axis=1) if norm == "l1" else np.sqrt((rows * rows).sum(axis=1))
    return np.sort(np.argsort(scores, kind="stable")[:count])


def apply(found: Trace, removed: np.ndarray) -> None:
    """Slice the producer, its bias-like constants and its consumers; update the traced value shapes."""
    keep = np.setdiff1d(np.arange(found.channels), removed)
    _take(found.weight, keep, found.axis)
    for value, axis in found.constants:
        _take(value, keep, axis)
    for _, weight, axis in found.consumers:
        _take(weight, keep, axis)
    for node in found.grouped:
        node.attributes["group"] = ir.AttrInt64("group", len(keep))
    for value, channel_axis in found.values:
        if channel_axis is None or value.shape is None or value.shape.rank() < -channel_axis:
            value.shape = None  # unknown is always valid; shape inference can fill it in again
        else:
            dims = list(value.shape.dims)
            dims[channel_axis] = len(keep)
            value.shape = ir.Shape(dims)


def _take(value: ir.Value, keep: np.ndarray, axis: int) -> None:
    array = constant_array(value)
    axis %= array.ndim
    kept: dict[int, np.ndarray] = dict(value.meta.get(KEPT, {}))
    kept[axis] = kept[axis][keep] if axis in kept else keep
    set_constant(value, np.take(array, keep, axis=axis))
    value.meta[KEPT] = kept
