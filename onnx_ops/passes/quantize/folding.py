"""Exact graph rewrites before static int8: fewer float element-wise nodes between the quantized layers.

In a static QDQ model every float node between two quantized Convs costs a DequantizeLinear, the float op
and a QuantizeLinear, and ONNX Runtime fuses none of them into its int8 Conv. Exporters leave many that
fold away exactly (measured on PP-OCRv4's recogniser: its learnable affine blocks ``y = s * x + b`` after
each Conv and each activation, 80 Mul/Add nodes, and hard-swish as four nodes ``x * clip(x + 3, 0, 6) / 6``;
ONNX Runtime's own Conv-Mul fusion skips them because the constant is the Mul's first input or has shape
[1]). Rewrites, each exact up to float rounding:

- Conv followed by Mul/Add with a constant per output channel (or a scalar): folded into the Conv's weight
  and bias.
- Mul by a scalar whose readers are all Convs (their input): folded into those Convs' weights (zero padding
  stays zero).
- Add of a scalar whose readers are all Convs without padding: folded into their biases.
- Mul by a scalar then Add of a scalar, read by Convs with padding: the Add first (of the shift divided by
  the scale), the scale into the Convs' weights.
- ``x * clip(x + 3, 0, 6) / 6``: ``x * HardSigmoid(x)`` (alpha 1/6, beta 0.5), as ONNX's HardSwish function
  is defined, in two nodes instead of four (available at every opset the quantizer accepts).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__: list[str] = []  # package-private

_FLOAT = onnx.TensorProto.FLOAT


class _Graph:
    """Index of a graph's initializers and readers (rebuilt after every rewrite)."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        graph = proto.graph
        self.graph = graph
        overridable = {value.name for value in graph.input}
        self.inits = {init.name: init for init in graph.initializer if init.name not in overridable}
        self.readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.readers[name].append(node)
        self.outputs = {value.name for value in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return numpy_helper.to_array(init) if init is not None and init.data_type == _FLOAT else None

    def only_reader(self, name: str) -> onnx.NodeProto | None:
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def own(self, name: str) -> bool:
        """True if `name` is a float initializer read by one node only (safe to change in place)."""
        return self.constant(name) is not None and len(self.readers.get(name, [])) == 1

    def set(self, name: str, value: np.ndarray) -> None:
        self.inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    def add(self, name: str, value: np.ndarray) -> str:
        taken = set(self.inits) | {out for node in self.graph.node for out in node.output}
        unique, count = name, 0
        while unique in taken:
            count += 1
            unique = f"{name}_{count}"
        self.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), unique))
        return unique


def fold(proto: onnx.ModelProto) -> dict[str, int]:
    """Apply the rewrites in place until none applies; returns how many of each were made."""
    done: collections.Counter[str] = collections.Counter()
    rules: tuple[tuple[str, Callable[[_Graph], bool]], ...] = (
        ("hard_swish", _hard_swish),
        ("conv_affine", _conv_affine),
        ("scale_into_conv", lambda g: _into_convs(g, "Mul")),
        ("shift_into_conv", lambda g: _into_convs(g, "Add")),
        ("scale_past_shift", _scale_past_shift),
    )
    changed = True
    while changed:
        changed = False
        for name, rule in rules:
            while rule(_Graph(proto)):
                done[name] += 1
                changed = True
    return dict(done)


def _other(node: onnx.NodeProto, name: str) -> str:
    return str(node.input[1] if node.input[0] == name else node.input[0])


def _conv_weights(g: _Graph, conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """The Conv's weight and bias (zeros when it has none) if both may be changed in place, else None."""
    if conv.op_type != "Conv" or len(conv.input) < 2 or not g.own(conv.input[1]):
        return None
    weight = g.constant(conv.input[1])
    assert weight is not None
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    if has_bias and not g.own(conv.input[2]):
        return None
    bias = g.constant(conv.input[2]) if has_bias else np.zeros(weight.shape[0], np.float32)
    return (weight, bias) if bias is not None and bias.shape == (weight.shape[0],) else None


def _set_bias(g: _Graph, conv: onnx.NodeProto, bias: np.ndarray) -> None:
    if len(conv.input) > 2 and conv.input[2]:
        g.set(conv.input[2], bias)
        return
    while len(conv.input) < 3:
        conv.input.append("")
    conv.input[2] = g.add(f"{conv.name or conv.output[0]}_bias", bias)


def _per_channel(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """`value` as one number per output channel if it broadcasts that way against a [N, M, ...] output."""
    if value.ndim > rank:  # it would broadcast the output to a higher rank
        return None
    if value.size == 1:
        return np.full(channels, float(value.ravel()[0]), np.float32)
    shape = list(value.shape)
    if len(shape) < rank - 1 or value.size != channels:
        return None
    shape = [1] * (rank - len(shape)) + shape  # broadcast from the right
    return value.reshape(channels) if shape[1] == channels else None


def _conv_affine(g: _Graph) -> bool:
    for conv in g.graph.node:
        found = _conv_weights(g, conv)
        after = g.only_reader(conv.output[0]) if found else None
        if found is None or after is None or after.op_type not in ("Mul", "Add") or len(after.input) != 2:
            continue
        constant = g.constant(_other(after, conv.output[0]))
        weight, bias = found
        channels = _per_channel(constant, weight.shape[0], weight.ndim) if constant is not None else None
        if channels is None or after.input[0] == after.input[1]:
            continue
        if after.op_type == "Mul":
            g.set(conv.input[1], weight * channels.reshape(-1, *[1] * (weight.ndim - 1)))
            bias = bias * channels
        else:
            bias = bias + channels
        _set_bias(g, conv, bias)
        conv.output[0] = after.output[0]
        g.graph.node.remove(after)
        return True
    return False


def _readers_are_convs(g: _Graph, name: str, *, unpadded: bool) -> list[onnx.NodeProto] | None:
    readers = g.readers.get(name, [])
    if not readers or name in g.outputs:
        return None
    for reader in readers:
        if reader.op_type != "Conv" or reader.input[0] != name or name in reader.input[1:]:
            return None
        if _conv_weights(g, reader) is None or (unpadded and _padded(reader)):
            return None
    return readers


def _padded(conv: onnx.NodeProto) -> bool:
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    return bool(any(attributes.get("pads", []))) or auto_pad not in (b"NOTSET", b"VALID")


def _scalar_input(g: _Graph, node: onnx.NodeProto, op_type: str) -> tuple[str, float] | None:
    """(the variable input, the scalar) of a Mul/Add by a scalar constant."""
    if node.op_type != op_type or len(node.input) != 2 or node.input[0] == node.input[1]:
        return None
    for variable, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        value = g.constant(other)
        if value is not None and value.size == 1 and g.constant(variable) is None:
            return variable, float(value.ravel()[0])
    return None


def _into_convs(g: _Graph, op_type: str) -> bool:
    """Fold a Mul by a scalar into the weights of the Convs reading it, an Add of one into their biases."""
    for node in g.graph.node:
        found = _scalar_input(g, node, op_type)
        convs = _readers_are_convs(g, node.output[0], unpadded=op_type == "Add") if found else None
        if found is None or convs is None or not _same_shape_out(g, node, found[0]):
            continue
        for conv in convs:
            weight, bias = _conv_weights(g, conv) or (np.zeros(0), np.zeros(0))
            if op_type == "Mul":
                g.set(conv.input[1], weight * found[1])
            else:  # only Convs without padding: a padded border would see the shift as zero
                _set_bias(g, conv, bias + found[1] * weight.reshape(weight.shape[0], -1).sum(1))
            conv.input[0] = found[0]
        g.graph.node.remove(node)
        return True
    return False


def _scale_past_shift(g: _Graph) -> bool:
    """``Conv(s * x + b)``, padded or not, as ``Conv'(x + b / s)`` with the scale in the Conv's weights."""
    for mul in g.graph.node:
        found = _scalar_input(g, mul, "Mul")
        add = g.only_reader(mul.output[0]) if found is not None and found[1] != 0.0 else None
        shift = _scalar_input(g, add, "Add") if add is not None else None
        convs = _readers_are_convs(g, add.output[0], unpadded=False) if add is not None and shift else None
        if found is None or add is None or shift is None or convs is None or shift[0] != mul.output[0]:
            continue
        if not (_same_shape_out(g, mul, found[0]) and _same_shape_out(g, add, shift[0])):
            continue
        for conv in convs:
            weight = g.constant(conv.input[1])
            assert weight is not None
            g.set(conv.input[1], weight * found[1])
        constant = _other(add, mul.output[0])
        add.input[:] = [found[0], g.add(f"{constant}_unscaled", np.array([shift[1] / found[1]], np.float32))]
        g.graph.node.remove(mul)
        return True
    return False


def _same_shape_out(g: _Graph, node: onnx.NodeProto, variable: str) -> bool:
    """A scalar's rank could still broadcast the output up (a [1, 1, 1, 1] constant on a 3-D input): refuse that."""
    scalar = g.inits[_other(node, variable)]
    return len(scalar.dims) <= 1


def _hard_swish(g: _Graph) -> bool:
    for add in g.graph.node:
        found = _scalar_input(g, add, "Add")
        if found is None or not np.isclose(found[1], 3.0):
            continue
        x = found[0]
        clip = g.only_reader(add.output[0])
        if clip is None or clip.op_type != "Clip" or not _clips(g, clip, 0.0, 6.0):
            continue
        mul = g.only_reader(clip.output[0])
        if mul is None or mul.op_type != "Mul" or sorted(mul.input) != sorted([x, clip.output[0]]):
            continue
        last = g.only_reader(mul.output[0])
        scale = _scalar_input(g, last, last.op_type) if last is not None and last.op_type in ("Mul", "Div") else None
        if last is None or scale is None or scale[0] != mul.output[0]:
            continue
        if not np.isclose(scale[1], 6.0 if last.op_type == "Div" else 1 / 6):
            continue
        if last.op_type == "Div" and last.input[0] != mul.output[0]:
            continue
        gate, name = f"{last.output[0]}_hard_sigmoid", last.name or last.output[0]
        index = list(g.graph.node).index(last)
        g.graph.node.insert(index, helper.make_node("Mul", [x, gate], [last.output[0]], name=f"{name}_hard_swish"))
        g.graph.node.insert(index, helper.make_node(
            "HardSigmoid", [x], [gate], alpha=1 / 6, beta=0.5, name=f"{name}_hard_sigmoid"
        ))  # fmt: skip
        for node in (add, clip, mul, last):
            g.graph.node.remove(node)
        return True
    return False


def _clips(g: _Graph, clip: onnx.NodeProto, low: float, high: float) -> bool:
    """True if the Clip bounds its input to [low, high] (opset 11+ inputs or opset 6 attributes)."""
    if len(clip.input) >= 3:
        bounds = [g.constant(name) if name else None for name in clip.input[1:3]]
        return all(b is not None and b.size == 1 for b in bounds) and np.allclose(
            [float(b.ravel()[0]) for b in bounds if b is not None], [low, high]
        )
    attributes = {a.name: helper.get_attribute_value(a) for a in clip.attribute}
    return bool(np.allclose([attributes.get("min", np.nan), attributes.get("max", np.nan)], [low, high]))
