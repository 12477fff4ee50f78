"""The weight layers of a static QDQ model that ONNX Runtime's quantizer wrote, and in-place edits of them.

A quantized Conv/MatMul/Gemm reads its activation, weight and (Conv, Gemm) bias through DequantizeLinear
nodes: activation ``x -> QuantizeLinear -> DequantizeLinear``, weight ``int8 initializer -> DequantizeLinear``
with a scale per output channel (or one) and bias ``int32 initializer -> DequantizeLinear`` with the scale
activation scale x weight scale. Recovery changes only the integer values behind these nodes (the weight's
int8 levels and the bias's int32 values): the scales ONNX Runtime chose stay. A layer can also be put back in
float: it then reads the float activation and float weight and bias directly, and its Q/DQ nodes that nothing
else reads are removed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_ops.capture import ConvGeometry, Layer

__all__: list[str] = []  # package-private

_OPS = frozenset({"Conv", "MatMul", "Gemm"})


@dataclasses.dataclass
class QdqLayer:
    """One quantized weight layer of a QDQ model (names of tensors and initializers in that model).

    Attributes:
        node: The Conv/MatMul/Gemm node's name.
        op_type: Its operator type.
        index: Its position in the graph's node list when found (topological order).
        activation: The dequantized activation it reads (the student's layer input).
        float_activation: The float tensor that activation quantizes (present in the float model too).
        output: Its output (the same tensor in the float model).
        weight: The int8 weight initializer; weight_scale and weight_zero its scale and zero point.
        axis: The weight's output-channel axis (its DequantizeLinear's axis when per channel).
        bias: The int32 bias initializer, or "" when the layer has no quantized bias.
        bias_scale: The bias's scale initializer ("" without bias).
        float_weight: The name the weight had in the float model (its DequantizeLinear input's source).
        float_bias: The name the bias had in the float model ("" without bias).
        conv: The Conv's geometry (None for MatMul/Gemm).
    """

    node: str
    op_type: str
    index: int
    activation: str
    float_activation: str
    output: str
    weight: str
    weight_scale: str
    weight_zero: str
    axis: int
    bias: str = ""
    bias_scale: str = ""
    float_weight: str = ""
    float_bias: str = ""
    conv: ConvGeometry | None = None
    group_inputs: int = 0  # a Conv's input channels per group

    @property
    def depthwise(self) -> bool:
        """A grouped Conv with one input channel per group (each output channel sees one channel's window)."""
        return self.conv is not None and self.conv.groups > 1 and self.group_inputs == 1

    def capture_layer(self, levels: np.ndarray) -> Layer:
        """The capture module's description of this layer (k and n per group for a grouped Conv)."""
        matrix = as_matrix(self, levels, self.conv.groups if self.conv else 1)
        return Layer(self.node, self.activation, self.output, k=matrix.shape[2], n=matrix.shape[1], conv=self.conv)


class QdqModel:
    """A QDQ model proto with its initializers and producers indexed by name (edits go into the proto)."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.inits = {init.name: init for init in proto.graph.initializer}
        self.producers = {out: node for node in proto.graph.node for out in node.output}

    def array(self, name: str) -> np.ndarray:
        """An initializer's values."""
        return numpy_helper.to_array(self.inits[name])

    def set_array(self, name: str, value: np.ndarray) -> None:
        """Replace an initializer's values (same name, dtype of `value`)."""
        self.inits[name].CopyFrom(numpy_helper.from_array(value, name))

    def requantized(self, name: str) -> str:
        """The tensor a float tensor becomes after QuantizeLinear -> DequantizeLinear ("" when it is not).

        ONNX Runtime renames a quantized graph output's producer output to ``<name>_QuantizeLinear_Input``
        and gives the original name to the DequantizeLinear after it: that name is the float model's.
        """
        readers = [node for node in self.proto.graph.node if name in node.input]
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            return ""
        after = [node for node in self.proto.graph.node if readers[0].output[0] in node.input]
        return after[0].output[0] if len(after) == 1 and after[0].op_type == "DequantizeLinear" else ""

    def _dequantized(self, name: str) -> onnx.NodeProto | None:
        node = self.producers.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def layers(self) -> list[QdqLayer]:
        """Every Conv/MatMul/Gemm whose activation and int8 weight come through DequantizeLinear."""
        found = []
        for index, node in enumerate(self.proto.graph.node):
            if node.op_type not in _OPS or len(node.input) < 2:
                continue
            act, weight = self._dequantized(node.input[0]), self._dequantized(node.input[1])
            if act is None or weight is None or weight.input[0] not in self.inits:
                continue
            if self.inits[weight.input[0]].data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
                continue
            quantize = self.producers.get(act.input[0])
            if quantize is None or quantize.op_type != "QuantizeLinear" or len(weight.input) < 3:
                continue
            if node.op_type == "Gemm" and _attribute(node, "transA", 0):
                continue
            transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attribute(node, "transB", 0))
            axis = 1 if transposed else 0  # the output channels: MatMul [K, N], Gemm [N, K] with transB, Conv [M, ...]
            layer = QdqLayer(
                node=node.name, op_type=node.op_type, index=index, activation=node.input[0],
                float_activation=quantize.input[0], output=node.output[0], weight=weight.input[0],
                weight_scale=weight.input[1], weight_zero=weight.input[2], axis=axis,
                float_weight=weight.input[0].removesuffix("_quantized"),
            )  # fmt: skip
            bias = self._dequantized(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if bias is not None and bias.input[0] in self.inits:
                layer.bias, layer.bias_scale = bias.input[0], bias.input[1]
                layer.float_bias = bias.input[0].removesuffix("_quantized")
            elif len(node.input) > 2 and node.input[2]:
                continue  # a float bias the recovery would not know how to correct
            if node.op_type == "Conv":
                attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                shape = tuple(self.inits[weight.input[0]].dims)
                layer.conv = ConvGeometry.from_attributes(attributes, shape)
                layer.group_inputs = shape[1]
            found.append(layer)
        return found

    def keep_float(self, layer: QdqLayer, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """Make the layer compute in float: float activation, float weight (and bias); drop unused Q/DQ nodes."""
        node = next(n for n in self.proto.graph.node if n.name == layer.node)
        names = [layer.float_activation, _unique(self, f"{layer.float_weight}_float")]
        self.proto.graph.initializer.append(numpy_helper.from_array(weight, names[1]))
        if bias is not None and layer.bias:
            names.append(_unique(self, f"{layer.float_bias}_float"))
            self.proto.graph.initializer.append(numpy_helper.from_array(bias, names[2]))
        for position, name in enumerate(names):
            node.input[position] = name
        self.inits = {init.name: init for init in self.proto.graph.initializer}
        _prune(self.proto)
        self.inits = {init.name: init for init in self.proto.graph.initializer}
        self.producers = {out: n for n in self.proto.graph.node for out in n.output}


def dequantize(model: QdqModel, layer: QdqLayer, levels: np.ndarray | None = None) -> np.ndarray:
    """The float weight the layer's int8 levels (its own, or `levels`) encode, in the weight's own layout."""
    q = (model.array(layer.weight) if levels is None else levels).astype(np.float64)
    scale, zero = model.array(layer.weight_scale).astype(np.float64), model.array(layer.weight_zero)
    return np.asarray((q - _along(zero.astype(np.float64), layer.axis, q.ndim)) * _along(scale, layer.axis, q.ndim))


def as_matrix(layer: QdqLayer, weight: np.ndarray, groups: int = 1) -> np.ndarray:
    """A weight as [groups, outputs per group, inputs]: rows are output channels, columns the layer's inputs."""
    if layer.op_type == "Conv":
        return weight.reshape(groups, weight.shape[0] // groups, -1)
    matrix = weight if layer.axis == 0 else weight.T  # MatMul [K, N] (axis 1) and Gemm without transB: transpose
    return matrix[None]


def from_matrix(layer: QdqLayer, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of as_matrix."""
    if layer.op_type == "Conv":
        return matrix.reshape(shape)
    return np.asarray(matrix[0] if layer.axis == 0 else matrix[0].T)


def channel_params(model: QdqModel, layer: QdqLayer, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of every output channel (broadcast when the weight has one per tensor)."""
    scale, zero = model.array(layer.weight_scale).astype(np.float64), model.array(layer.weight_zero)
    return np.broadcast_to(scale.ravel(), (rows,)).copy(), np.broadcast_to(zero.ravel(), (rows,)).astype(np.float64)


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    found = next((a for a in node.attribute if a.name == name), None)
    return int(found.i) if found is not None else default


def _unique(model: QdqModel, name: str) -> str:
    taken = set(model.inits) | set(model.producers)
    candidate, count = name, 0
    while candidate in taken:
        count += 1
        candidate = f"{name}_{count}"
    return candidate


def _prune(proto: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads (and no graph output is), then unused initializers."""
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if node.output and not any(o in used for o in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | outputs
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
