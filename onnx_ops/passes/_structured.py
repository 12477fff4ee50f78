"""Structured pruning: trace a layer's output channels to the consumers that can be shrunk with it.

A producer (MatMul, Gemm or group-1 Conv with a constant weight) owns a set of output channels.
``trace`` follows its output through nodes that act on each channel independently until it reaches
consumers whose weight has a matching input dimension. Only when every use of every value on that
path is understood can the channels be removed; otherwise ``trace`` returns the reason it stopped.

Followed: Add/Sub/Mul/Div/PRelu with a constant that is scalar or broadcasts along the channel axis
(sliced when it has one entry per channel) or with another value of the same trace (x * sigmoid(x)),
BatchNormalization, channel-wise unary ops (activations, Clip with constant bounds, Dropout,
Identity, Cast), Max/Average/Lp pools and their global forms, Flatten(axis=1) after a global pool.
Consumers: MatMul with a 2-D constant weight, Gemm (transA=0), Conv with group=1.
Refused: graph outputs, Concat/Reshape/Transpose/Shape/LayerNormalization/Softmax and any other op,
operands from other activations (residual Add), grouped or depthwise Conv, shared weights or
constants, excluded nodes, and anything inside subgraphs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnx_ops.passes._base import constant_array, is_constant_weight, set_constant

__all__ = ["PRODUCERS", "Trace", "apply", "choose_removed", "trace"]

PRODUCERS = frozenset({"MatMul", "Gemm", "Conv"})

# Elementwise ops that map each channel to itself and have no operand besides the activation
# (Clip's min/max and Dropout's ratio are scalars, checked below).
_UNARY = frozenset(
    {
        "Abs", "Cast", "Celu", "Clip", "Dropout", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish",
        "Identity", "LeakyRelu", "Log", "Mish", "Neg", "Reciprocal", "Relu", "Selu", "Sigmoid", "Softplus",
        "Softsign", "Sqrt", "Tanh",
    }
)  # fmt: skip
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "PRelu"})
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})


@dataclasses.dataclass(frozen=True)
class _State:
    """Where the channels sit in one traced value: negative axis, rank if known, spatial dims pooled to 1."""

    axis: int
    rank: int | None
    pooled: bool = False

    @property
    def is_axis1(self) -> bool:
        return self.rank is not None and self.rank + self.axis == 1


@dataclasses.dataclass
class Trace:
    """Everything that must be sliced to remove output channels of one producer.

    Attributes:
        producer: The node whose output channels are removed.
        weight: Its weight; ``axis`` is the output-channel axis of that weight.
        channels: Number of output channels before pruning.
        constants: Bias-like constants to slice, with the axis to slice along.
        values: Traced activations with their (negative) channel axis, for shape updates; None
            for unused extra outputs (Dropout mask, MaxPool indices), whose shape is dropped.
        consumers: Consumer nodes, their weight, and the input-channel axis of that weight.
    """

    producer: ir.Node
    weight: ir.Value
    axis: int
    channels: int
    constants: list[tuple[ir.Value, int]] = dataclasses.field(default_factory=list)
    values: list[tuple[ir.Value, int | None]] = dataclasses.field(default_factory=list)
    consumers: list[tuple[ir.Node, ir.Value, int]] = dataclasses.field(default_factory=list)


def trace(node: ir.Node, exclude: set[str]) -> Trace | str:
    """Find everything that shrinks with the output channels of ``node``, or say why it cannot be done."""
    start = _start(node)
    if isinstance(start, str):
        return start
    result, state = start
    pending: list[tuple[ir.Node, ir.Value]] = []
    states: dict[ir.Value, _State] = {node.outputs[0]: state}
    queue = [node.outputs[0]]
    visited: set[ir.Node] = set()
    while queue:
        value = queue.pop()
        result.values.append((value, states[value].axis))
        if value.is_graph_output():
            return f"output {value.name!r} reaches a graph output"
        for use in value.uses():
            user, index = use.node, use.idx
            if user in visited and user.op_type in _BINARY:
                continue
            step = _follow(user, index, states[value], result, exclude, pending)
            if isinstance(step, str):
                return step
            visited.add(user)
            for out, out_state in step:
                if out not in states:
                    states[out] = out_state
                    queue.append(out)
    for user, other in pending:
        if other not in states or states[other].axis != states[user.outputs[0]].axis:
            residual = " (residual)" if user.op_type == "Add" else ""
            return f"output feeds {user.op_type} {user.name!r} with another activation{residual}"
    if not result.consumers:
        return "no consumer whose weight can be shrunk"
    return result


def choose_removed(weight: np.ndarray, axis: int, sparsity: float, norm: str) -> np.ndarray:
    """Indices of the floor(sparsity * C) output channels with the smallest norm (at least one is kept)."""
    channels = weight.shape[axis]
    count = min(int(np.floor(sparsity * channels + 1e-9)), channels - 1)
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
    for value, channel_axis in found.values:
        if channel_axis is None or value.shape is None or value.shape.rank() < -channel_axis:
            value.shape = None  # unknown is always valid; shape inference can fill it in again
        else:
            dims = list(value.shape.dims)
            dims[channel_axis] = len(keep)
            value.shape = ir.Shape(dims)


def _take(value: ir.Value, keep: np.ndarray, axis: int) -> None:
    set_constant(value, np.take(constant_array(value), keep, axis=axis))


def _start(node: ir.Node) -> tuple[Trace, _State] | str:
    """Check the producer itself and return its trace seed and the channel state of its output."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or not is_constant_weight(weight):
        return "weight is not a constant"
    if len(weight.uses()) > 1:
        return f"weight {weight.name!r} is shared by {len(weight.uses())} nodes"
    if len(node.outputs) != 1:
        return "node has more than one output"
    w = constant_array(weight)
    attrs = node.attributes
    if node.op_type == "Conv":
        if attrs.get_int("group", 1) != 1:
            return "grouped or depthwise Conv"
        found, state = Trace(node, weight, 0, w.shape[0]), _State(-(w.ndim - 1), w.ndim)
    elif w.ndim != 2:
        return f"{node.op_type} weight has rank {w.ndim}, not 2"
    elif node.op_type == "Gemm":
        axis = 0 if attrs.get_int("transB", 0) else 1
        found, state = Trace(node, weight, axis, w.shape[axis]), _State(-1, 2)
    else:
        found, state = Trace(node, weight, 1, w.shape[1]), _State(-1, _matmul_rank(node))
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        # Gemm's C and Conv's B hold one entry per output channel along their last axis.
        reason = _add_constant(found, bias, -1, node)
        if reason:
            return reason
    return found, state


def _matmul_rank(node: ir.Node) -> int | None:
    for value in (node.inputs[0], node.outputs[0]):
        if value is not None and value.shape is not None:
            return max(value.shape.rank(), 2)
    return None


def _add_constant(found: Trace, value: ir.Value, axis: int, user: ir.Node) -> str | None:
    """Register a constant operand that broadcasts against the channels; None if it is fine."""
    if not is_constant_weight(value):
        return f"{user.op_type} {user.name!r} has a non-constant operand {value.name!r}"
    shape = constant_array(value).shape
    if len(shape) < -axis or shape[axis] == 1:
        return None  # broadcast along the channels: the same for every channel, nothing to slice
    if shape[axis] != found.channels:
        return f"constant {value.name!r} of shape {list(shape)} does not match {found.channels} channels"
    if len(value.uses()) > 1:
        return f"constant {value.name!r} is shared with other nodes"
    found.constants.append((value, len(shape) + axis))
    return None


def _follow(
    user: ir.Node, index: int, state: _State, found: Trace, exclude: set[str], pending: list[tuple[ir.Node, ir.Value]]
) -> list[tuple[ir.Value, _State]] | str:
    """Handle one use of a traced value: the values it leads to, or the reason to give up."""
    op, name = user.op_type, user.name
    if user.graph is not found.producer.graph or user.domain not in ("", "ai.onnx"):
        return f"output is used by {op} {name!r} outside the main ONNX graph"
    if name in exclude:
        return f"output feeds {op} {name!r}, which is in exclude_nodes"
    found.values.extend((out, None) for out in user.outputs[1:])
    if op in PRODUCERS:
        if index == 0 and len(user.inputs) > 1 and is_constant_weight(user.inputs[1]):
            return _consumer(user, state, found)
        return f"output feeds {op} {name!r} as an operand other than the activation next to a constant weight"
    if op in _BINARY:
        return _binary(user, index, state, found, pending)
    if index != 0 or _extra_outputs_used(user):
        return f"output feeds {op} {name!r} in a way that is not per-channel"
    if op in _UNARY:
        consts = [v for v in user.inputs[1:] if v is not None]
        if op == "Clip" and not all(is_constant_weight(v) for v in consts):
            return f"Clip {name!r} has non-constant bounds"
        return [(user.outputs[0], state)]
    if op == "BatchNormalization":
        if not state.is_axis1:
            return f"BatchNormalization {name!r}: channel axis is not axis 1 (or rank unknown)"
        for param in user.inputs[1:5]:
            reason = _add_constant(found, param, -1, user) if param is not None else "missing input"
            if reason:
                return reason
        return [(user.outputs[0], state)]
    if op in _POOLS or op in _GLOBAL_POOLS:
        if not state.is_axis1:
            return f"{op} {name!r}: channel axis is not axis 1 (or rank unknown)"
        return [(user.outputs[0], dataclasses.replace(state, pooled=state.pooled or op in _GLOBAL_POOLS))]
    if op == "Flatten" and state.is_axis1 and user.attributes.get_int("axis", 1) == 1 and state.pooled:
        return [(user.outputs[0], _State(-1, 2))]
    return f"output feeds {op} {name!r}, which is not known to be per-channel"


def _extra_outputs_used(node: ir.Node) -> bool:
    return any(out.uses() or out.is_graph_output() for out in node.outputs[1:])


def _binary(
    user: ir.Node, index: int, state: _State, found: Trace, pending: list[tuple[ir.Node, ir.Value]]
) -> list[tuple[ir.Value, _State]] | str:
    if user.op_type == "PRelu" and index != 0:
        return f"output is the slope of PRelu {user.name!r}"
    rank, pooled = state.rank, state.pooled
    for other in user.inputs:
        if other is None or other is user.inputs[index]:
            continue
        if is_constant_weight(other):
            reason = _add_constant(found, other, state.axis, user)
            if reason:
                return reason
            # A constant of higher rank broadcasts the result to its rank.
            rank = None if rank is None else max(rank, constant_array(other).ndim)
        else:
            # Fine only if the other operand is part of this same trace (x * sigmoid(x)); checked at the end.
            pending.append((user, other))
            pooled = False  # one operand may be pooled to 1x1 and the other not
    return [(user.outputs[0], _State(state.axis, rank, pooled))]


def _consumer(user: ir.Node, state: _State, found: Trace) -> list[tuple[ir.Value, _State]] | str:
    """Register a MatMul/Gemm/Conv that takes the traced value as its activation input."""
    weight = user.inputs[1]
    assert weight is not None
    w = constant_array(weight)
    op, name, attrs = user.op_type, user.name, user.attributes
    if len(weight.uses()) > 1:
        return f"consumer weight {weight.name!r} is shared by {len(weight.uses())} nodes"
    if op == "Conv":
        ok = attrs.get_int("group", 1) == 1 and state.is_axis1 and state.rank == w.ndim
        axis = 1
    elif op == "Gemm":
        ok = attrs.get_int("transA", 0) == 0 and state.axis == -1 and w.ndim == 2
        axis = 1 if attrs.get_int("transB", 0) else 0
    else:
        ok, axis = state.axis == -1 and w.ndim == 2, 0
    if not ok or w.shape[axis] != found.channels:
        return f"output feeds {op} {name!r} whose weight cannot be shrunk along {found.channels} channels"
    found.consumers.append((user, weight, axis))
    return []
