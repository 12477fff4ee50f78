"""Dynamic int8 of MatMul and Gather built here, in place and tensor by tensor, as ONNX Runtime's quantize_dynamic does.

ONNX Runtime's ``quantize_dynamic`` loads the whole model, runs shape inference on a copy, and writes a new model:
three to four times the model's size in memory. For the graphs it writes for MatMul (DynamicQuantizeLinear ->
MatMulInteger -> Cast -> Mul by the product of the two scales) and Gather (a uint8 table -> DequantizeLinear), this
module writes the same nodes, names and initializers itself, with ONNX Runtime's weight arithmetic
(``compute_scale_zp`` and ``quantize_nparray`` of ``onnxruntime.quantization.quant_utils``, vectorized over the
channels), one weight at a time: each float weight is dropped once its last user is quantized. Where ONNX Runtime
would do something else (any Gemm, which it rewrites to MatMul + Add; Conv, LSTM, Attention; a weight shared by a
Gather and a MatMul; a quantized Gather feeding another quantized node; old opsets, float16), ``plan`` says why
and the pass calls ONNX Runtime's quantizer instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
from onnx_ir import convenience
from onnx_ir.passes import common

from onnx_ops.passes.quantize import embeddings
from onnx_ops.report import LayerChange

__all__: list[str] = []  # package-private: the pass in onnx_ops.passes.quantize is the interface

_OWN_OPS = frozenset({"MatMul", "Gather"})
# ONNX Runtime's dynamic quantizer only touches a Transpose whose input it quantized (never, on this path).
_PASSIVE_OPS = frozenset({"Transpose"})
_CHUNK_BYTES = 16 << 20  # float rows quantized at a time: the temporary stays small beside the weight


@dataclasses.dataclass(frozen=True)
class Settings:
    """The options of ONNX Runtime's quantize_dynamic this path reproduces."""

    per_channel: bool
    reduce_range: bool
    weight_type: str  # "int8" or "uint8"
    column_tables: bool = False  # embedding tables on one int8 grid per column (opset >= 13), not ORT's one grid


@dataclasses.dataclass
class Plan:
    """The nodes to quantize, in graph order (nothing changed yet)."""

    matmuls: list[ir.Node]
    gathers: list[ir.Node]


@dataclasses.dataclass(frozen=True)
class _Quantized:
    q: ir.Value
    scale: ir.Value
    zero_point: ir.Value


def infer_types(model: ir.Model, selected: Iterable[ir.Node]) -> None:
    """Infer the types of the MatMul data inputs not known yet (ONNX shape inference, initializers left out)."""
    if any(n.op_type == "MatMul" and n.inputs[0] is not None and n.inputs[0].dtype is None for n in selected):
        common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model)


def plan(model: ir.Model, selected: Iterable[ir.Node], ort_types: frozenset[str]) -> Plan | str:
    """The MatMul and Gather nodes to quantize here, or why ONNX Runtime's quantizer must do it.

    Args:
        model: The model (not changed).
        selected: The nodes ONNX Runtime would be asked to quantize (op type wanted, not excluded).
        ort_types: Every op type ONNX Runtime's dynamic quantizer has a quantizer for.
    """
    graph = model.graph
    if gemm := next((n for n in ir.traversal.RecursiveGraphIterator(graph) if n.op_type == "Gemm"), None):
        return f"it rewrites Gemm nodes ({gemm.name}) to MatMul + Add itself"
    chosen = [node for node in selected if node.domain in ("", "ai.onnx")]
    if other := sorted({n.op_type for n in chosen} - _OWN_OPS - _PASSIVE_OPS):
        return f"ONNX Runtime quantizes {', '.join(other)}"
    matmuls = [n for n in chosen if n.op_type == "MatMul" and _constant(n.inputs[1])]
    gathers = [n for n in chosen if n.op_type == "Gather" and _constant(n.inputs[0])]
    for node in matmuls:
        weight, data = node.inputs[1], node.inputs[0]
        assert weight is not None and weight.const_value is not None
        if weight.const_value.dtype != ir.DataType.FLOAT or len(weight.shape or ()) != 2 or not weight.const_value.size:
            return f"the weight of {node.name} is not a non-empty 2-D float32 tensor"
        if data is None or data.const_value is not None or data.dtype != ir.DataType.FLOAT:
            return f"the data input of {node.name} is not a float32 activation of known type"
    for node in gathers:
        table = node.inputs[0]
        assert table is not None and table.const_value is not None
        if table.const_value.dtype != ir.DataType.FLOAT or not table.const_value.size:
            return f"the table of {node.name} is not a non-empty float32 tensor"
    chosen_set = set(chosen)
    tables = {id(n.inputs[0]) for n in gathers}
    if any(id(n.inputs[1]) in tables for n in matmuls):
        return "a weight is both a Gather table and a MatMul weight"
    for node in gathers:
        for use in node.outputs[0].uses():
            if use.node in chosen_set or (use.node.op_type in ort_types and use.node.graph is not graph):
                return f"the quantized output of {node.name} feeds {use.node.op_type} {use.node.name}"
    if clash := _name_clash(graph, matmuls, gathers):
        return f"the name {clash} is taken"
    return Plan(matmuls, gathers)


def apply(model: ir.Model, found: Plan, settings: Settings) -> list[LayerChange]:
    """Quantize the planned nodes in place; each float weight leaves the graph once its last user is quantized."""
    graph = model.graph
    weights: dict[int, _Quantized] = {}
    activations: dict[int, ir.Node] = {}
    changes: list[LayerChange] = []
    for node in found.gathers:
        table = node.inputs[0]
        assert table is not None
        columns = settings.column_tables and _private_table(node, table)
        if id(table) not in weights:
            weights[id(table)] = (
                _column_table(graph, table) if columns else _quantize_weight(graph, table, "uint8", False, False)
            )
            changes.append(_change(node, table, weights[id(table)]))
        _rewrite_gather(graph, node, weights[id(table)], columns)
        _drop_if_unused(graph, table)
    for node in found.matmuls:
        data, weight = node.inputs[0], node.inputs[1]
        assert data is not None and weight is not None
        if id(weight) not in weights:
            weights[id(weight)] = _quantize_weight(
                graph, weight, settings.weight_type, settings.reduce_range, settings.per_channel
            )
            changes.append(_change(node, weight, weights[id(weight)]))
        if id(data) not in activations:
            name = data.name or ""
            dynamic = ir.node("DynamicQuantizeLinear", [data], name=f"{name}_QuantizeLinear", num_outputs=3)
            types = (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8)
            for output, suffix, dtype in zip(dynamic.outputs, ("quantized", "scale", "zero_point"), types, strict=True):
                output.name, output.type = f"{name}_{suffix}", ir.TensorType(dtype)
            dynamic.outputs[0].shape = data.shape
            dynamic.outputs[1].shape = dynamic.outputs[2].shape = ir.Shape([])
            graph.insert_before(node, dynamic)
            activations[id(data)] = dynamic
        _rewrite_matmul(graph, node, activations[id(data)], weights[id(weight)])
        _drop_if_unused(graph, weight)
    return changes


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and not value.is_graph_input() and value.const_value is not None


def _name_clash(graph: ir.Graph, matmuls: list[ir.Node], gathers: list[ir.Node]) -> str | None:
    taken = {v.name for node in graph for v in (*node.inputs, *node.outputs) if v is not None}
    taken |= set(graph.initializers) | {v.name for v in graph.inputs} | {n.name for n in graph}
    wanted: set[str] = set()
    for node in matmuls:
        data, weight, out = node.inputs[0], node.inputs[1], node.outputs[0]
        assert data is not None and weight is not None
        wanted |= {f"{data.name}_{s}" for s in ("quantized", "scale", "zero_point", "QuantizeLinear")}
        wanted |= {f"{weight.name}_{s}" for s in ("quantized", "scale", "zero_point")}
        wanted |= {f"{node.name}_quant", f"{node.name}_quant_scales_mul", f"{node.name}_quant_output_scale_mul"}
        wanted |= {f"{out.name}_output_quantized", f"{out.name}_output_quantized_cast_output"}
    for node in gathers:
        table, out = node.inputs[0], node.outputs[0]
        assert table is not None
        wanted |= {f"{table.name}_{s}" for s in ("quantized", "scale", "zero_point")}
        wanted |= {f"{out.name}_quantized", f"{out.name}_DequantizeLinear"}
    return next(iter(sorted(wanted & taken)), None)


def _drop_if_unused(graph: ir.Graph, weight: ir.Value) -> None:
    if not weight.uses() and not weight.is_graph_output():
        graph.initializers.pop(weight.name or "", None)
        weight.const_value = None


def quantize_array(
    array: np.ndarray, weight_type: str, reduce_range: bool, per_channel: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quantized, scale, zero point) of a float32 array as ONNX Runtime's quantizer computes them, bit for bit.

    Per tensor, or per channel of the last axis. Symmetric for int8 weights, asymmetric for uint8; with
    reduce_range the scale covers 7 bits (clipping is to the full type, as in ONNX Runtime).
    """
    symmetric = weight_type == "int8"
    qtype = np.int8 if symmetric else np.uint8
    if reduce_range:
        qmin, qmax = (-64, 64) if symmetric else (0, 127)
    else:
        qmin, qmax = (-127, 127) if symmetric else (0, 255)
    axis = tuple(range(array.ndim - 1)) if per_channel else None
    rmin = np.minimum(array.min(axis=axis), np.float32(0)).astype(np.float32)
    rmax = np.maximum(array.max(axis=axis), np.float32(0)).astype(np.float32)
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, absmax
    scale64 = (rmax.astype(np.float64) - rmin.astype(np.float64)) / np.float64(qmax - qmin)
    scale = scale64.astype(np.float32)
    tiny = scale64 < np.finfo(np.float32).tiny
    if symmetric:
        zero = np.zeros(scale.shape, qtype)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.round(qmin - rmin / np.where(tiny, 1.0, scale64)).astype(qtype)
    scale = np.where(tiny, np.float32(1.0), scale).astype(np.float32)
    zero = np.where(tiny, qtype(0), zero).astype(qtype)
    info = np.iinfo(qtype)
    out = np.empty(array.shape, qtype)
    rows = max(1, _CHUNK_BYTES // max(1, array[:1].nbytes)) if array.ndim > 1 else array.shape[0]
    for start in range(0, array.shape[0], rows):  # a float temporary of a few rows, not of the whole weight
        part = array[start : start + rows] / scale
        np.round(part, out=part)
        part += zero
        np.clip(part, info.min, info.max, out=part)
        out[start : start + rows] = part
    return out, scale, zero


def _quantize_weight(graph: ir.Graph, weight: ir.Value, weight_type: str, reduce: bool, channels: bool) -> _Quantized:
    tensor = weight.const_value
    assert tensor is not None
    q, scale, zero = quantize_array(tensor.numpy(), weight_type, reduce, channels)
    name = weight.name or ""
    values = _Quantized(
        _initializer(f"{name}_quantized", q),
        _initializer(f"{name}_scale", scale),
        _initializer(f"{name}_zero_point", zero),
    )
    for value in (values.scale, values.zero_point, values.q):
        graph.register_initializer(value)
    return values


def _rewrite_matmul(graph: ir.Graph, node: ir.Node, dynamic: ir.Node, weight: _Quantized) -> None:
    out = node.outputs[0]
    a_q, a_scale, a_zero = dynamic.outputs
    integer = ir.node("MatMulInteger", [a_q, weight.q, a_zero, weight.zero_point], name=f"{node.name}_quant")
    integer.outputs[0].name = f"{out.name}_output_quantized"
    integer.outputs[0].type, integer.outputs[0].shape = ir.TensorType(ir.DataType.INT32), out.shape
    cast_name = f"{out.name}_output_quantized_cast"
    cast = ir.node("Cast", integer.outputs, attributes={"to": ir.DataType.FLOAT}, name=cast_name)
    cast.outputs[0].name = f"{out.name}_output_quantized_cast_output"
    cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), out.shape
    scales = ir.node("Mul", [a_scale, weight.scale], name=f"{node.name}_quant_scales_mul")
    scales.outputs[0].name = f"{node.name}_quant_scales_mul:0"
    scales.outputs[0].type, scales.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), weight.scale.shape
    result = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{node.name}_quant_output_scale_mul")
    result.outputs[0].type, result.outputs[0].shape = out.type, out.shape
    convenience.replace_nodes_and_values(graph, node, [node], [scales, integer, cast, result], [out], result.outputs)


def _private_table(node: ir.Node, table: ir.Value) -> bool:
    """True if a 2-D table is read by this Gather alone, along axis 0 (its columns can get their own grids)."""
    tensor = table.const_value
    axis = node.attributes.get_int("axis", 0)
    return tensor is not None and len(tensor.shape) == 2 and axis == 0 and len(table.uses()) == 1


def _column_table(graph: ir.Graph, table: ir.Value) -> _Quantized:
    """A Gather table as symmetric int8 with one scale per column (embeddings.column_grid)."""
    tensor = table.const_value
    assert tensor is not None
    levels, steps = embeddings.column_grid(tensor.numpy())
    name = table.name or ""
    values = _Quantized(
        _initializer(f"{name}_quantized", levels),
        _initializer(f"{name}_scale", steps),
        _initializer(f"{name}_zero_point", np.zeros(steps.shape, np.int8)),
    )
    for value in (values.scale, values.zero_point, values.q):
        graph.register_initializer(value)
    return values


def _rewrite_gather(graph: ir.Graph, node: ir.Node, table: _Quantized, columns: bool) -> None:
    out = node.outputs[0]
    gather = ir.node("Gather", [table.q, node.inputs[1]], attributes=dict(node.attributes), name=node.name)
    gather.outputs[0].name = f"{out.name}_quantized"
    levels = table.q.const_value
    assert levels is not None
    gather.outputs[0].type, gather.outputs[0].shape = ir.TensorType(levels.dtype), out.shape
    dequantize = ir.node(
        "DequantizeLinear", [gather.outputs[0], table.scale, table.zero_point], name=f"{out.name}_DequantizeLinear",
        attributes={"axis": -1} if columns else None,
    )  # fmt: skip
    dequantize.outputs[0].type, dequantize.outputs[0].shape = out.type, out.shape
    convenience.replace_nodes_and_values(graph, node, [node], [gather, dequantize], [out], dequantize.outputs)


def _change(node: ir.Node, weight: ir.Value, quantized: _Quantized) -> LayerChange:
    tensor = quantized.q.const_value
    scale = quantized.scale.const_value
    assert tensor is not None and scale is not None
    shape = list(tensor.shape.numpy())
    return LayerChange(
        name=node.name or "", op_type=node.op_type, weight=weight.name or "", shape_before=shape, shape_after=shape,
        params_before=tensor.size, params_after=tensor.size,
        note=f"{tensor.dtype.name.lower()} {'per-channel' if scale.size > 1 else 'per-tensor'}",
    )  # fmt: skip


def _initializer(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
