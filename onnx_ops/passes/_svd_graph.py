"""The graph side of low-rank factorization: which nodes qualify, and rewriting a node through its factors.

``MatMul(x, W)`` becomes ``MatMul(MatMul(x, A), B)``, ``MatMul(W, x)`` becomes ``MatMul(A, MatMul(B, x))``, and
``Gemm`` becomes MatMuls plus an optional Transpose (transA) and Add (bias), with transB and alpha folded into the
factors. Only the main graph is rewritten; weights inside If/Loop bodies are left alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnx_ops.passes._base import constant_array, is_constant_weight, non_finite_reason
from onnx_ops.plan import SvdStep

__all__ = ["Candidate", "Names", "add_initializer", "attr", "candidate", "label", "rewrite", "sharing_problem"]

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)
_RECURRENT = ("LSTM", "GRU", "RNN")


@dataclasses.dataclass
class Candidate:
    """A node whose constant weight may be factorized; ``left`` means MatMul(W, x)."""

    node: ir.Node
    weight: ir.Value
    left: bool = False

    @property
    def key(self) -> tuple[bool, float, int]:
        """What the effective matrix depends on besides the weight (shared weights must agree on it)."""
        return self.left, attr(self.node, "alpha", 1.0), int(attr(self.node, "transB", 0))

    def matrix_shape(self) -> tuple[int, int]:
        """The shape of `matrix()` without building it."""
        assert self.weight.const_value is not None
        k, n = (int(d) for d in self.weight.const_value.shape.numpy())
        return (n, k) if self.key[2] else (k, n)

    def matrix(self) -> np.ndarray:
        """The matrix to factorize, with Gemm's transB and alpha folded in, in a float type LAPACK takes."""
        w = constant_array(self.weight)
        w = w.astype(np.float64 if w.dtype == np.float64 else np.float32)
        _, alpha, trans_b = self.key
        w = w.T if trans_b else w
        return np.ascontiguousarray(w * np.asarray(alpha, w.dtype) if alpha != 1.0 else w)


class Names:
    """Fresh value/node names that clash with nothing already in the graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self._used = {v.name for v in graph.inputs} | set(graph.initializers)
        self._used |= {n.name for n in graph} | {v.name for n in graph for v in n.outputs}

    def fresh(self, base: str) -> str:
        """A name starting with base that is not used yet (and is now reserved)."""
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name


def label(node: ir.Node) -> str:
    """The node's name for reports (its first output's name when it has none)."""
    return node.name or (node.outputs[0].name or node.op_type)


def attr(node: ir.Node, name: str, default: float) -> float:
    """A numeric attribute of node, or default."""
    found = node.attributes.get(name)
    return default if found is None else found.value


def candidate(node: ir.Node, step: SvdStep) -> Candidate | str | None:
    """A candidate, or the reason a weighted node is skipped, or None when the node holds no weight."""
    if node.op_type in _RECURRENT and node.domain == "":
        return "recurrent (LSTM/GRU/RNN) weights are not factorized by svd"
    if node.op_type not in step.op_types or node.domain != "" or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if not is_constant_weight(w) and not is_constant_weight(x):
        return None  # e.g. attention's Q @ K^T: no weight
    if not is_constant_weight(w) and node.op_type == "Gemm":
        return "Gemm with a constant A and a variable B is not handled"
    c = Candidate(node, w) if is_constant_weight(w) else Candidate(node, x, left=True)  # type: ignore[arg-type]
    tensor, name = c.weight.const_value, c.weight.name
    assert tensor is not None
    if label(node) in step.exclude_nodes:
        return "excluded by exclude_nodes"
    if len(tensor.shape) != 2:
        return f"weight '{name}' is {len(tensor.shape)}-D; only 2-D weights are factorized"
    if tensor.dtype not in _FLOAT_TYPES:
        return f"weight '{name}' is {tensor.dtype.name}, not float"
    if tensor.size < step.min_elements:
        return f"weight '{name}' has {tensor.size} elements < min_elements {step.min_elements}"
    return non_finite_reason(c.weight) or c


def sharing_problem(weight: ir.Value, candidates: list[Candidate]) -> str | None:
    """Why a weight used by several nodes cannot be replaced by one pair of factors, or None."""
    # A weight that something else still reads would stay in the model next to its factors: more parameters.
    if len(weight.uses()) != len(candidates) or weight.is_graph_output():
        users = sorted({u.node.op_type for u in weight.uses()})
        return f"weight '{weight.name}' is also used by {', '.join(users)} nodes; factors would add parameters"
    if len({c.key for c in candidates}) > 1:
        return f"weight '{weight.name}' is shared by nodes with different side/alpha/transB"
    return None


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    """Register array (cast to dtype) as a new initializer named name."""
    array = array.astype(dtype.numpy(), copy=False)
    value = ir.val(name, dtype, array.shape, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def rewrite(
    graph: ir.Graph, c: Candidate, a: ir.Value, b: ir.Value, names: Names, bias: ir.Value | None = None
) -> None:
    """Swap c.node for MatMuls through the factors, keeping its output value name (it may be a graph output).

    Args:
        graph: The main graph.
        c: The node and its weight.
        a: The first factor [K, r].
        b: The second factor [r, N].
        names: Fresh names.
        bias: A Gemm's replacement bias (already scaled by beta), or None to keep its C and beta.
    """
    node, dtype = c.node, a.dtype
    base = label(node)

    def op(op_type: str, inputs: list[ir.Value | None], **attributes: object) -> ir.Node:
        output = ir.val(names.fresh(f"{base}_svd_{op_type.lower()}"), dtype)
        return ir.node(op_type, inputs, attributes, outputs=[output], name=names.fresh(f"{base}_svd_{op_type}"))  # type: ignore[arg-type]

    x = node.inputs[1] if c.left else node.inputs[0]
    new: list[ir.Node] = []
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        new.append(op("Transpose", [x], perm=[1, 0]))  # Gemm inputs are 2-D, so this is the transpose
        x = new[-1].outputs[0]
    if c.left:
        new.append(op("MatMul", [b, x]))
        new.append(op("MatMul", [a, new[-1].outputs[0]]))
    else:
        new.append(op("MatMul", [x, a]))
        new.append(op("MatMul", [new[-1].outputs[0], b]))
    product = new[-1].outputs[0]
    bias = bias if bias is not None else _bias(graph, node, names, op, new)
    if bias is not None:
        new.append(op("Add", [product, bias]))
    old_inputs = list(node.inputs)
    ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, [new[-1].outputs[0]])
    for value in old_inputs:
        if value is not None and value.is_initializer() and not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)  # type: ignore[arg-type]


def _bias(
    graph: ir.Graph, node: ir.Node, names: Names, op: Callable[..., ir.Node], new: list[ir.Node]
) -> ir.Value | None:
    """Gemm's beta * C as a value (folded into a new initializer when C is constant), or None."""
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    beta = attr(node, "beta", 1.0)
    if bias is None or beta == 0.0 or beta == 1.0:
        return None if beta == 0.0 else bias
    dtype = bias.dtype or ir.DataType.FLOAT
    if is_constant_weight(bias):
        name = names.fresh(f"{bias.name}_beta")
        return add_initializer(graph, name, constant_array(bias) * np.asarray(beta, dtype.numpy()), dtype)
    scale = add_initializer(graph, names.fresh(f"{label(node)}_beta"), np.asarray(beta), dtype)
    new.append(op("Mul", [bias, scale]))
    return new[-1].outputs[0]
