"""The op-by-op rules of structured pruning's trace (see ``_structured``): what each node does to the channels."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnx_ops.passes._base import constant_array, is_constant_weight

__all__ = ["BINARY", "KEPT", "PRODUCERS", "State", "Trace", "follow", "mirror", "start"]

PRODUCERS = frozenset({"MatMul", "Gemm", "Conv"})
KEPT = "onnx_ops.structured.kept"  # ir.Value.meta key: {axis: indices of the original tensor kept along it}

# Elementwise ops that map each channel to itself and have no operand besides the activation
# (Clip's min/max and Dropout's ratio are scalars, checked below).
_UNARY = frozenset(
    {
        "Abs", "Cast", "Celu", "Clip", "Dropout", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish",
        "Identity", "LeakyRelu", "Log", "Mish", "Neg", "Reciprocal", "Relu", "Selu", "Sigmoid", "Softplus",
        "Softsign", "Sqrt", "Tanh",
    }
)  # fmt: skip
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "PRelu"})
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})


@dataclasses.dataclass(frozen=True)
class State:
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
        grouped: Depthwise Conv nodes on the path, whose ``group`` becomes the number of kept channels.
    """

    producer: ir.Node
    weight: ir.Value
    axis: int
    channels: int
    constants: list[tuple[ir.Value, int]] = dataclasses.field(default_factory=list)
    values: list[tuple[ir.Value, int | None]] = dataclasses.field(default_factory=list)
    consumers: list[tuple[ir.Node, ir.Value, int]] = dataclasses.field(default_factory=list)
    grouped: list[ir.Node] = dataclasses.field(default_factory=list)


def start(node: ir.Node) -> tuple[Trace, State] | str:
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
        found, state = Trace(node, weight, 0, w.shape[0]), State(-(w.ndim - 1), w.ndim)
    elif w.ndim != 2:
        return f"{node.op_type} weight has rank {w.ndim}, not 2"
    elif node.op_type == "Gemm":
        axis = 0 if attrs.get_int("transB", 0) else 1
        found, state = Trace(node, weight, axis, w.shape[axis]), State(-1, 2)
    else:
        found, state = Trace(node, weight, 1, w.shape[1]), State(-1, _matmul_rank(node))
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


def follow(
    user: ir.Node, index: int, state: State, found: Trace, exclude: set[str], pending: list[tuple[ir.Node, ir.Value]]
) -> list[tuple[ir.Value, State]] | str:
    """Handle one use of a traced value: the values it leads to, or the reason to give up."""
    op, name = user.op_type, user.name
    if user.graph is not found.producer.graph or user.domain not in ("", "ai.onnx"):
        return f"output is used by {op} {name!r} outside the main ONNX graph"
    if name in exclude:
        return f"output feeds {op} {name!r}, which is in exclude_nodes"
    found.values.extend((out, None) for out in user.outputs[1:])
    if op == "Conv" and user.attributes.get_int("group", 1) != 1:
        return _depthwise(user, index, state, found)
    if op in PRODUCERS:
        if index == 0 and len(user.inputs) > 1 and is_constant_weight(user.inputs[1]):
            return _consumer(user, state, found)
        return f"output feeds {op} {name!r} as an operand other than the activation next to a constant weight"
    if op in BINARY:
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
        return [(user.outputs[0], State(-1, 2))]
    return f"output feeds {op} {name!r}, which is not known to be per-channel"


def _extra_outputs_used(node: ir.Node) -> bool:
    return any(out.uses() or out.is_graph_output() for out in node.outputs[1:])


def _binary(
    user: ir.Node, index: int, state: State, found: Trace, pending: list[tuple[ir.Node, ir.Value]]
) -> list[tuple[ir.Value, State]] | str:
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
    return [(user.outputs[0], State(state.axis, rank, pooled))]


def _consumer(user: ir.Node, state: State, found: Trace) -> list[tuple[ir.Value, State]] | str:
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


def _depthwise(user: ir.Node, index: int, state: State, found: Trace) -> list[tuple[ir.Value, State]] | str:
    """Follow a depthwise Conv (one output channel per input channel): slice its weight and bias."""
    weight = user.inputs[1] if len(user.inputs) > 1 else None
    ok = index == 0 and state.is_axis1 and weight is not None and is_constant_weight(weight)
    if not ok or user.attributes.get_int("group", 1) != found.channels:
        return f"output feeds grouped Conv {user.name!r} that is not depthwise over {found.channels} channels"
    assert weight is not None
    shape = constant_array(weight).shape
    if shape[0] != found.channels or shape[1] != 1:
        return f"grouped Conv {user.name!r} has weight {list(shape)}, not one filter per channel"
    for value in (weight, user.inputs[2] if len(user.inputs) > 2 else None):
        reason = _add_constant(found, value, 0, user) if value is not None else None
        if reason:
            return reason
    found.grouped.append(user)
    return [(user.outputs[0], state)]


def mirror(value: ir.Value, state: State, found: Trace, exclude: set[str], states: dict[ir.Value, State]) -> bool:
    """Register the layer whose per-channel output ``value`` is (through channel-wise ops) as a mirror.

    Its output channels are removed with the same indices as the traced ones; True on success. Nothing is
    registered unless the whole chain is understood and used only here.
    """
    chain: list[ir.Value] = []
    scratch = Trace(found.producer, found.weight, found.axis, found.channels)  # constants, kept on success
    while True:
        node = value.producer()
        if node is None or value.is_graph_output() or len(value.uses()) != 1 or node.name in exclude:
            return False
        if node.graph is not found.producer.graph or node.domain not in ("", "ai.onnx"):
            return False
        chain.append(value)
        if node.op_type in PRODUCERS:
            break
        acts = [v for v in node.inputs if v is not None and not is_constant_weight(v)]
        consts = [v for v in node.inputs if v is not None and is_constant_weight(v)]
        if len(acts) != 1 or node.op_type not in _UNARY | BINARY or node.op_type == "PRelu":
            return False
        if node.op_type in BINARY and any(_add_constant(scratch, v, state.axis, node) for v in consts):
            return False
        if node.op_type in _UNARY and node.inputs[0] is not acts[0]:
            return False
        value = acts[0]
    seed = start(node)
    if isinstance(seed, str) or seed[0].channels != found.channels or seed[1].axis != state.axis:
        return False
    if seed[0].axis in seed[0].weight.meta.get(KEPT, {}):
        return False  # its channels were removed already (with its own or another trace): never twice
    mirror = seed[0]
    found.constants.append((mirror.weight, mirror.axis))
    found.constants.extend(mirror.constants + scratch.constants)
    found.values.extend((v, state.axis) for v in chain)
    for v in chain:
        states[v] = state
    return True
