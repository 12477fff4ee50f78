"""Helpers of the int4 pass: Gemm as MatMul, and what each 4-bit layer costs and how far it is from its float weight.

ONNX Runtime's 4-bit quantizer handles MatMul and Gather only, so a Gemm with a constant weight becomes
``MatMul(A, alpha * B')`` plus ``Add(beta * C)`` first. After quantization each MatMulNBits and
GatherBlockQuantized node is decoded back to float here (the layouts of ONNX Runtime's contrib operators) to
report the relative error of the weight it now holds, and the bytes of its quantized weight, scales and zero points.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnx_ops.passes._base import constant_array, is_constant_weight
from onnx_ops.report import LayerChange

__all__ = ["QUANTIZED_OPS", "all_graphs", "dequantized", "gemm_as_matmul", "layer_change", "layer_changes"]

# Operators of an already quantized model: int4 and fp16 refuse such models (quantizing again stacks scales on
# rounded values; float16 cannot feed them).
QUANTIZED_OPS = frozenset({
    "MatMulNBits", "GatherBlockQuantized", "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear",
    "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearConv", "ConvInteger",
    "DynamicQuantizeLSTM", "QAttention",
})  # fmt: skip
_DEFAULT_ZERO = 8  # MatMulNBits / GatherBlockQuantized with uint4 data and no zero points: the middle level


def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def gemm_as_matmul(graph: ir.Graph, node: ir.Node) -> ir.Node | str:
    """Replace a Gemm with a constant B by MatMul (+ Add); the MatMul keeps the Gemm's name. A reason when it cannot."""
    if _attr(node, "transA", 0):
        return "Gemm with transA is left in float"
    a, b = node.inputs[0], node.inputs[1]
    if a is None or b is None or not is_constant_weight(b):
        return "Gemm without a constant B is left in float"
    weight = constant_array(b)
    if weight.ndim != 2 or weight.dtype != np.float32:
        return f"weight '{b.name}' is not a 2-D float32 matrix"
    weight = weight.T if _attr(node, "transB", 0) else weight
    weight = (weight * np.float32(_attr(node, "alpha", 1.0))).astype(np.float32)
    name = node.name or "gemm"
    matrix = ir.val(f"{b.name}_as_matmul", ir.DataType.FLOAT, ir.Shape(weight.shape), const_value=ir.tensor(weight))
    matrix.const_value.name = matrix.name  # type: ignore[union-attr]
    graph.register_initializer(matrix)
    product = ir.val(f"{name}_matmul_out", ir.DataType.FLOAT)
    new = [ir.node("MatMul", [a, matrix], outputs=[product], name=name)]
    bias, beta = (node.inputs[2] if len(node.inputs) > 2 else None), _attr(node, "beta", 1.0)
    if bias is not None and beta != 0.0:
        if beta != 1.0:
            scale = ir.val(f"{name}_beta", ir.DataType.FLOAT, ir.Shape([]), const_value=ir.tensor(np.float32(beta)))
            graph.register_initializer(scale)
            new.append(ir.node("Mul", [bias, scale], outputs=[ir.val(f"{name}_bias", ir.DataType.FLOAT)]))
            bias = new[-1].outputs[0]
        new.append(ir.node("Add", [product, bias], outputs=[ir.val(f"{name}_sum", ir.DataType.FLOAT)]))
    old = list(node.inputs)
    node.name = f"{name}_gemm"
    ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, [new[-1].outputs[0]])
    for value in old:
        if value is not None and value.is_initializer() and not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)  # type: ignore[arg-type]
    return new[0]


def layer_changes(
    proto: onnx.ModelProto, before: dict[str, tuple[str, str, ir.TensorProtocol]], method: str, block_size: int
) -> tuple[list[LayerChange], int, int]:
    """Per 4-bit node: bytes before and after and the relative error of its weight; and the two byte totals.

    Args:
        proto: The quantized model.
        before: Name of each quantized node -> (its original op type, its weight's name, the float weight's tensor,
            read one at a time).
        method: The step's method (embedding Gathers are always rounded to nearest).
        block_size: The step's block size.
    """
    kinds = ("MatMulNBits", "GatherBlockQuantized")
    needed = {name for node in proto.graph.node if node.op_type in kinds for name in node.input}
    tensors = {init.name: ir.from_proto(init) for init in proto.graph.initializer if init.name in needed}
    sizes = {name: tensor.nbytes for name, tensor in tensors.items()}
    arrays = {name: tensor.numpy() for name, tensor in tensors.items()}
    layers, total_before, total_after = [], 0, 0
    for node in proto.graph.node:
        if node.op_type not in kinds:
            continue
        op, weight, tensor = before[node.name.removesuffix("_Q4")]
        original = tensor.numpy()
        decoded = dequantized(node, arrays)
        norm = float(np.linalg.norm(original)) or 1.0
        error = None if decoded is None else float(np.linalg.norm(decoded - original)) / norm
        layer, after = layer_change(node, sizes, (op, weight, original.shape), error, method, block_size)
        layers.append(layer)
        total_before, total_after = total_before + tensor.nbytes, total_after + after
    return layers, total_before, total_after


def layer_change(
    node: onnx.NodeProto,
    sizes: dict[str, int],
    before: tuple[str, str, tuple[int, ...]],
    error: float | None,
    method: str,
    block_size: int,
) -> tuple[LayerChange, int]:
    """The report line of one 4-bit node (bytes before and after, the relative error of its weight); its bytes.

    Args:
        node: A MatMulNBits or GatherBlockQuantized node.
        sizes: The bytes of its quantized tensors by name (at least those it reads).
        before: (the original op type, the weight's name, the float weight's shape).
        error: The relative error (Frobenius norm) of the weight it computes with, None when not known.
        method: The step's method (embedding Gathers are always rounded to nearest).
        block_size: The step's block size.
    """
    op, weight, shape = before
    after = _quantized_bytes(node, sizes)
    size = int(np.prod(shape))
    rounding = "rtn" if op == "Gather" else method
    return LayerChange(
        name=node.name.removesuffix("_Q4"), op_type=op, weight=weight, shape_before=list(shape),
        shape_after=list(shape), params_before=size, params_after=size, rel_error=error,
        note=f"int4 {rounding}, blocks of {block_size}: {size * 4} -> {after} bytes",
    ), after  # fmt: skip


def _quantized_bytes(node: onnx.NodeProto, sizes: dict[str, int]) -> int:
    """Bytes of the quantized weight, scales and zero points a MatMulNBits or GatherBlockQuantized node reads."""
    inputs = node.input[1:] if node.op_type == "MatMulNBits" else [node.input[0], *node.input[2:]]
    return sum(sizes.get(name, 0) for name in inputs)


def dequantized(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The float weight a MatMulNBits ([K, N]) or GatherBlockQuantized ([rows, cols]) node computes with."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    block = int(attrs["block_size"])
    if node.op_type == "MatMulNBits":
        k, n = int(attrs["K"]), int(attrs["N"])
        packed, scales = arrays[node.input[1]], arrays[node.input[2]]
        zeros = arrays.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        blocks = packed.shape[1]
        levels = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block).astype(np.float32)
        return (_scaled(levels, scales, zeros, n, blocks).reshape(n, blocks * block)[:, :k]).T
    if node.op_type == "GatherBlockQuantized" and int(attrs.get("quantize_axis", 1)) == 1:
        data = arrays[node.input[0]]
        rows, cols = data.shape
        blocks = -(-cols // block)
        levels = np.pad(data.astype(np.float32), ((0, 0), (0, blocks * block - cols))).reshape(rows, blocks, block)
        zeros = arrays.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if zeros is None and data.dtype.name.startswith("int"):
            zeros = np.zeros((rows, blocks), np.float32)  # signed int4: symmetric around 0
        elif zeros is not None:
            zeros = zeros.astype(np.float32)
        return _scaled(levels, arrays[node.input[2]], zeros, rows, blocks).reshape(rows, blocks * block)[:, :cols]
    return None


def _scaled(levels: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, rows: int, blocks: int) -> np.ndarray:
    """(levels - zero) * scale per block; zeros either float/int per block or 4-bit packed two a byte."""
    scale = scales.astype(np.float32).reshape(rows, blocks, 1)
    if zeros is None:
        zero: np.ndarray | int = _DEFAULT_ZERO
    elif zeros.dtype == np.uint8:  # MatMulNBits: uint4 zero points packed two a byte
        pairs = zeros.reshape(rows, -1)
        zero = np.stack([pairs & 0x0F, pairs >> 4], axis=-1).reshape(rows, -1)[:, :blocks, None].astype(np.float32)
    else:
        zero = zeros.astype(np.float32).reshape(rows, blocks, 1)
    return np.asarray((levels - zero) * scale, np.float32)


def all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """The graph and every subgraph in it (ONNX Runtime's quantizer visits them all)."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                found.extend(all_graphs(sub))
    return found
