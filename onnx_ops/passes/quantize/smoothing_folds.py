"""Smoothing factors folded into the nodes that produce the activation, so no Mul is added at run time.

Attention's context, ``softmax(QK^T) V`` reshaped back to [.., channels], takes a per-channel factor for free:
every channel of it is a weighted sum of the same channel of V, so the factor goes into the columns of V's
MatMul weight and its bias. Between V's bias Add and the attention MatMul, and between that MatMul and the
activation, only Reshape and Transpose nodes may sit, and every tensor on the way may be read by nothing else
(Shape nodes aside: a scale does not change shapes). The caller checks the float outputs afterwards.

Not folded: the constant of GELU's last Mul (``x * 0.5``), which would take a vector just as well, because ONNX
Runtime then no longer fuses the GELU: the int8 MiniLM ran 1.2x slower.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__: list[str] = []  # package-private

_LAYOUT = frozenset({"Reshape", "Transpose"})


class Folder:
    """Folds per-channel factors into the producers of activations in one graph (edits go into the proto)."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.graph = proto.graph
        self.inits = {init.name: init for init in self.graph.initializer}
        self.producers = {name: node for node in self.graph.node for name in node.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.users.setdefault(name, []).append(node)
        self.outputs = {o.name for o in self.graph.output}

    def fold(self, activation: str, inverse: np.ndarray, readers: list[onnx.NodeProto]) -> bool:
        """Multiply `activation`'s channels by `inverse` inside its producer; False (nothing changed) if none fits."""
        if not self._private(activation, readers):
            return False
        return self._attention_values(activation, inverse)

    def _private(self, tensor: str, readers: list[onnx.NodeProto]) -> bool:
        """True if only `readers` (and Shape nodes) read the tensor and it is no graph output."""
        others = [n for n in self.users.get(tensor, []) if n.op_type != "Shape" and all(n is not r for r in readers)]
        return not others and tensor not in self.outputs

    def _attention_values(self, activation: str, inverse: np.ndarray) -> bool:
        matmul = self._through_layout(activation)
        if matmul is None or matmul.op_type != "MatMul" or not self._private(matmul.input[1], [matmul]):
            return False
        add = self._through_layout(matmul.input[1])
        if add is None or add.op_type != "Add":
            return False
        bias_index = next((i for i, name in enumerate(add.input) if name in self.inits), None)
        if bias_index is None:
            return False
        bias_name, product = add.input[bias_index], add.input[1 - bias_index]
        values = self.producers.get(product)
        if values is None or values.op_type != "MatMul" or values.input[1] not in self.inits:
            return False
        weight, bias = self.inits[values.input[1]], self.inits[bias_name]
        w, b = numpy_helper.to_array(weight), numpy_helper.to_array(bias)
        shared = any(len(self.users.get(name, [])) != 1 for name in (weight.name, bias.name, product))
        if shared or w.ndim != 2 or w.shape[1] != inverse.size or b.shape != (inverse.size,):
            return False
        weight.CopyFrom(numpy_helper.from_array((w * inverse[None, :]).astype(np.float32), weight.name))
        bias.CopyFrom(numpy_helper.from_array((b * inverse).astype(np.float32), bias.name))
        return True

    def _through_layout(self, tensor: str) -> onnx.NodeProto | None:
        """The first producer up from tensor that is not a Reshape/Transpose read only by the path."""
        node = self.producers.get(tensor)
        while node is not None and node.op_type in _LAYOUT:
            if not self._private(node.input[0], [node]):
                return None
            node = self.producers.get(node.input[0])
        return node
