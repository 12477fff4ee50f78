"""Int8 storage of the weights of layers left in float: int8 -> Cast -> Mul, folded back by ONNX Runtime at load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_ops.passes._base import non_finite_reason
from onnx_ops.report import LayerChange
from onnx_ops.validate import clean_message

__all__ = ["STORABLE_OPS"]

_WEIGHT_OPS = frozenset({"Conv", "MatMul", "Gemm"})
_RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
STORABLE_OPS = _WEIGHT_OPS | _RECURRENT_OPS  # whose float weights float_layer_weights may store as int8
_MIN_STORED_ELEMENTS = 256  # smaller weights gain less than their scale and two nodes cost


def _has_weight(node: ir.Node) -> bool:
    """True if a float input of at least 2 dimensions is constant (an initializer or a Constant node)."""
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
            return True
        tensor = value.const_value if value is not None else None
        if tensor is not None and tensor.dtype.is_floating_point() and len(tensor.shape) >= 2:
            return True
    return False


def _store_int8(model: ir.Model, notes: dict[str, str]) -> list[LayerChange]:
    """Replace the float weights of each node named in `notes` by int8 -> Cast -> Mul(scale per output channel).

    Symmetric int8 (-127..127, zero point 0). Only float32 initializers of at least _MIN_STORED_ELEMENTS that
    only this node uses (and that are not graph inputs) are changed. ONNX Runtime's constant folding turns the
    Cast and Mul back into one float initializer when it loads the model, so the layer runs as before; a
    DequantizeLinear would not be folded, and Conv would lose its pre-packed weight (measured 1.3-2.5x slower).
    """
    changes = []
    for node in list(model.graph):
        if node.name not in notes:
            continue
        for index, axis in _weight_axes(node):
            weight = node.inputs[index] if index < len(node.inputs) else None
            tensor = weight.const_value if weight is not None else None
            if (
                weight is None
                or tensor is None
                or not weight.is_initializer()
                or weight.is_graph_input()
                or tensor.dtype != ir.DataType.FLOAT
                or tensor.size < _MIN_STORED_ELEMENTS
                or len(weight.uses()) != 1
                or non_finite_reason(weight)
            ):
                continue
            array = tensor.numpy()
            axis = axis % array.ndim
            others = tuple(i for i in range(array.ndim) if i != axis)
            shape = [1] * array.ndim
            shape[axis] = -1
            scale = (np.abs(array).max(axis=others) / 127.0).astype(np.float32).reshape(shape)
            scale[scale == 0] = 1.0  # an all-zero channel
            quantized = np.clip(np.round(array / scale), -127, 127).astype(np.int8)
            name = weight.name or f"{node.name}_input{index}"
            stored, scales = _initializer(f"{name}_int8", quantized), _initializer(f"{name}_scale", scale)
            model.graph.register_initializer(stored)
            model.graph.register_initializer(scales)
            cast = ir.node("Cast", [stored], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_cast")
            mul = ir.node("Mul", [cast.outputs[0], scales], name=f"{name}_scale")
            for output, suffix in ((cast.outputs[0], "cast"), (mul.outputs[0], "float")):
                output.name, output.shape = f"{name}_{suffix}", weight.shape
                output.type = ir.TensorType(ir.DataType.FLOAT)
            model.graph.insert_before(node, [cast, mul])
            node.replace_input_with(index, mul.outputs[0])
            model.graph.initializers.pop(weight.name or "")
            restored = quantized.astype(np.float32) * scale
            changes.append(LayerChange(
                name=node.name or name, op_type=node.op_type, weight=name, shape_before=list(array.shape),
                shape_after=list(array.shape), params_before=int(array.size), params_after=int(array.size),
                rel_error=float(np.linalg.norm(restored - array) / (np.linalg.norm(array) or 1.0)),
                note=notes[node.name or ""],
            ))  # fmt: skip
    return changes


def _weight_axes(node: ir.Node) -> list[tuple[int, int]]:
    """(input index, output-channel axis) of each weight of a layer whose weights can be stored as int8."""
    if node.op_type == "Conv":
        return [(1, 0)]  # [M, C/group, k...]
    if node.op_type == "Gemm":
        attribute = node.attributes.get("transB")
        return [(1, 0 if attribute is not None and attribute.as_int() else 1)]
    if node.op_type == "MatMul":
        return [(1, -1)]  # the output columns
    if node.op_type in _RECURRENT_OPS:
        return [(1, 1), (2, 1)]  # W and R: [directions, gates x hidden, input or hidden]
    return []


def _unfolded(model: ir.Model, weights: set[str], workdir: Path) -> str:
    """Which stored weights ONNX Runtime's basic graph optimizations leave as int8 -> Cast -> Mul ("" if none)."""
    optimized = workdir / "int8_storage_optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
        used = {name for node in onnx.load(optimized).graph.node for name in node.input}
    except Exception as e:  # whatever it is, the model without int8 storage is the safe one
        return f"it could not check: {clean_message(str(e), limit=120)}"
    finally:
        optimized.unlink(missing_ok=True)
    left = sorted(weight for weight in weights if f"{weight}_int8" in used)
    return ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")


def _initializer(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
