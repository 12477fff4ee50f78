"""Linear layers of a graph (MatMul, Gemm, Conv with a constant weight) as the capture API sees them.

A layer's weight, whatever its stored layout, is viewed as ``[groups, k, n]`` matrices with ``Y = X @ W``
per group: MatMul ``[k, n]`` as is, Gemm with ``transB`` transposed and scaled by ``alpha``, Conv
``[Cout, Cin/groups, *kernel]`` reshaped to ``[groups, Cin/groups * prod(kernel), Cout/groups]`` (the
im2col order of ``onnx_ops.im2col``). ``Linear.matrices`` and ``Linear.store`` convert both ways, so a
data-aware pass works on the matrices and never on the layout.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from onnx_ops.capture import Layer
from onnx_ops.im2col import ConvGeometry
from onnx_ops.passes._base import constant_array, is_constant_weight, set_constant

__all__ = ["Linear", "from_matrices", "is_linear", "layer_bias", "linear", "weight_matrices"]

OPS = ("MatMul", "Gemm", "Conv")


@dataclasses.dataclass
class Linear:
    """One linear layer: its node, weight, optional constant bias, the Layer to capture, and its layout.

    Attributes:
        node: The MatMul, Gemm or Conv node.
        weight: Its constant weight.
        bias: A constant bias vector refit with the weight (Gemm C, Conv B, or a constant Add after a MatMul).
        layer: What capture collects: the node's activation input and the tensor the bias ends in.
        alpha: Gemm's alpha (the stored weight times alpha is the matrix), else 1.
        beta: Gemm's beta (the stored bias times beta is the bias), else 1.
        level: Sequential level (1 + the deepest layer of interest upstream); set by the caller.
    """

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    layer: Layer
    alpha: float = 1.0
    beta: float = 1.0
    level: int = 0

    @property
    def name(self) -> str:
        """The layer's name for reports."""
        return self.layer.name

    def matrices(self) -> np.ndarray:
        """The weight as float64 [groups, k, n] matrices (Gemm's alpha applied)."""
        return weight_matrices(self.node, constant_array(self.weight)).astype(np.float64) * self.alpha

    def bias_rows(self) -> np.ndarray:
        """The bias as float64 [groups, n] (beta applied); zeros when the layer has none."""
        g, n = self.layer.groups, self.layer.n
        if self.bias is None:
            return np.zeros((g, n))
        return constant_array(self.bias).astype(np.float64).reshape(g, n) * self.beta

    def store(self, matrices: np.ndarray, bias: np.ndarray | None) -> None:
        """Write [groups, k, n] matrices (and a [groups, n] bias) back in the stored layouts, as float32."""
        stored = constant_array(self.weight)
        array = from_matrices(self.node, matrices / self.alpha, stored.shape)
        set_constant(self.weight, np.ascontiguousarray(array, dtype=np.float32))
        if bias is not None and self.bias is not None:
            shape = constant_array(self.bias).shape
            set_constant(self.bias, (bias / self.beta).astype(np.float32).reshape(shape))


def weight_matrices(node: ir.Node, stored: np.ndarray) -> np.ndarray:
    """A MatMul/Gemm/Conv weight array in its stored layout as [groups, k, n] matrices (no alpha)."""
    if node.op_type == "Conv":
        g = _int(node, "group", 1)
        return stored.reshape(g, stored.shape[0] // g, -1).transpose(0, 2, 1)
    if node.op_type == "Gemm" and _int(node, "transB", 0):
        return stored.T[None]
    return stored[None]


def from_matrices(node: ir.Node, matrices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """[groups, k, n] matrices back in the stored layout of this node's weight (the inverse of weight_matrices)."""
    if node.op_type == "Conv":
        return matrices.transpose(0, 2, 1).reshape(shape)
    array: np.ndarray = matrices[0].T if node.op_type == "Gemm" and _int(node, "transB", 0) else matrices[0]
    return array


def _int(node: ir.Node, name: str, default: int) -> int:
    value = node.attributes.get_int(name)
    return default if value is None else value


def is_linear(node: ir.Node) -> bool:
    """A MatMul/Gemm (2-D) or Conv (3-D or more) of an activation by a constant float32 weight."""
    if node.op_type not in OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight, act = node.inputs[1], node.inputs[0]
    if not is_constant_weight(weight) or weight is None or weight.const_value is None:
        return False
    rank = len(weight.const_value.shape)
    return (
        weight.const_value.dtype == ir.DataType.FLOAT
        and (rank >= 3 if node.op_type == "Conv" else rank == 2)
        and act is not None
        and act.const_value is None
    )


def linear(node: ir.Node) -> Linear | str:
    """The Linear of an is_linear node, or why a layer-wise fit cannot handle it."""
    weight, act = node.inputs[1], node.inputs[0]
    assert weight is not None and act is not None and weight.const_value is not None
    name = node.name or weight.name or "?"
    matrices = weight_matrices(node, constant_array(weight))
    groups, k, n = matrices.shape
    if node.op_type == "Gemm" and _int(node, "transA", 0):
        return "Gemm with transA=1 is not handled"
    alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
    beta = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
    if alpha == 0.0:
        return "Gemm with alpha=0"
    bias, output = layer_bias(node, groups * n)
    if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None and bias is None:
        return f"{node.op_type} bias is not a constant vector used only here"
    conv = None
    if node.op_type == "Conv":
        attributes = {a.name: a.value for a in node.attributes.values()}
        conv = ConvGeometry.from_attributes(attributes, tuple(constant_array(weight).shape))
    layer = Layer(name=name, input=act.name or "", output=output.name or "", k=int(k), n=int(n), conv=conv)
    return Linear(node, weight, bias, layer, alpha, beta)


def layer_bias(node: ir.Node, n: int) -> tuple[ir.Value | None, ir.Value]:
    """The layer's constant bias vector (Gemm C, Conv B, or a following Add's constant) and its output tensor."""
    out = node.outputs[0]
    if node.op_type in ("Gemm", "Conv"):
        c = node.inputs[2] if len(node.inputs) > 2 else None
        return (c if _vector(c, n) else None), out
    uses = list(out.uses())
    graph = node.graph
    if len(uses) != 1 or (graph is not None and out in graph.outputs):
        return None, out
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, out
    other = add.inputs[1 - uses[0].idx]
    if not _vector(other, n):
        return None, out
    return other, add.outputs[0]


def _vector(value: ir.Value | None, n: int) -> bool:
    """A constant float32 tensor of n values along its last axis only, used by one node."""
    if value is None or not is_constant_weight(value) or value.const_value is None:
        return False
    shape = value.const_value.numpy().shape
    return (
        value.const_value.dtype == ir.DataType.FLOAT
        and len(shape) >= 1
        and shape[-1] == n
        and math.prod(shape) == n
        and len(value.uses()) == 1
    )
