"""Smoothing factors folded into the nodes that produce the activation, so no Mul is added at run time.

Attention's context, ``softmax(QK^T) V`` reshaped back to [.., channels], takes a per-channel factor for free:
every channel of it is a weighted sum of the same channel of V, so the factor goes into the columns of V's
MatMul weight and its bias. Between V's bias Add and the attention MatMul, and between that MatMul and the
activation, only Reshape and Transpose nodes may sit, and every tensor on the way may be read by nothing else
(Shape nodes aside: a scale does not change shapes). The rewrite is exact in real arithmetic; the tests check
the float outputs.

Not folded: the constant of GELU's last Mul (``x * 0.5``), which would take a vector just as well, because ONNX
Runtime then no longer fuses the GELU: the int8 MiniLM ran 1.2x slower.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__: list[str] = []  # package-private

_LAYOUT = frozenset({"Reshape", "Transpose"})


def fold(activation: ir.Value, inverse: np.ndarray, readers: list[ir.Node]) -> bool:
    """Multiply `activation`'s channels by `inverse` inside its producer; False (nothing changed) if none fits."""
    if not _private(activation, readers):
        return False
    matmul = _through_layout(activation)
    if matmul is None or matmul.op_type != "MatMul" or not _private(matmul.inputs[1], [matmul]):
        return False
    add = _through_layout(matmul.inputs[1])
    if add is None or add.op_type != "Add" or len(add.inputs) != 2:
        return False
    bias_index = next((i for i, value in enumerate(add.inputs) if _constant(value)), None)
    if bias_index is None:
        return False
    bias, product = add.inputs[bias_index], add.inputs[1 - bias_index]
    values = product.producer() if product is not None else None
    if values is None or values.op_type != "MatMul" or not _constant(values.inputs[1]):
        return False
    weight = values.inputs[1]
    assert weight is not None and bias is not None and product is not None
    assert weight.const_value is not None and bias.const_value is not None
    w, b = weight.const_value.numpy(), bias.const_value.numpy()
    shared = any(len(value.uses()) != 1 for value in (weight, bias, product))
    if shared or w.ndim != 2 or w.shape[1] != inverse.size or b.shape != (inverse.size,):
        return False
    _replace(weight, w * inverse[None, :])
    _replace(bias, b * inverse)
    return True


def _replace(value: ir.Value, array: np.ndarray) -> None:
    """Give the constant `value` new float32 contents (the old tensor, maybe a mapped file, is let go)."""
    value.const_value = ir.tensor(array.astype(np.float32), name=value.name)


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer()


def _private(value: ir.Value | None, readers: list[ir.Node]) -> bool:
    """True if only `readers` (and Shape nodes) read the value and it is no graph output."""
    if value is None or value.is_graph_output():
        return False
    return all(use.node.op_type == "Shape" or any(use.node is r for r in readers) for use in value.uses())


def _through_layout(value: ir.Value | None) -> ir.Node | None:
    """The first producer up from `value` that is not a Reshape/Transpose read only by the path."""
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in _LAYOUT:
        if not _private(node.inputs[0], [node]):
            return None
        source = node.inputs[0]
        node = source.producer() if source is not None else None
    return node
