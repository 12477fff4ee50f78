"""The int4 pass's own path: each chosen MatMul or Gather quantized in place, one weight at a time.

ONNX Runtime's ``MatMulNBitsQuantizer`` takes a whole ModelProto: the model's weights serialized once more beside the
job's memory-mapped copy, and its result parsed back. Here each chosen node is handed, with its one weight, to the
same per-node quantizer ONNX Runtime's uses (``DefaultWeightOnlyQuantizer.quantize``: its C++ block quantizer for
MatMul, its ``quantize_ndarray`` for Gather) inside a graph of that node alone; the node and tensors it returns
replace the float node in the IR, and the float weight leaves as its 4-bit version arrives. The nodes, their names
and attributes and the tensors are those ``MatMulNBitsQuantizer`` writes (tests/test_int4_own.py compares them).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.quantization import matmul_nbits_quantizer as nbits

from onnx_ops.passes._base import sum_squares
from onnx_ops.passes._int4_layers import dequantized, layer_change
from onnx_ops.report import LayerChange

__all__ = ["quantize_node"]

_CONTRIB = "com.microsoft"
_PIECE_ELEMENTS = 1 << 22  # a weight is quantized (and its error measured) about 16 MB of float32 at a time


def quantize_node(
    graph: ir.Graph,
    node: ir.Node,
    config: nbits.DefaultWeightOnlyQuantConfig,
    record: tuple[str, str],
) -> tuple[LayerChange, int]:
    """Replace `node` (MatMul or Gather, its weight a constant of this graph) by ONNX Runtime's 4-bit node.

    Args:
        graph: The graph holding node and its weight.
        node: A MatMul (weight: input 1) or Gather (weight: input 0) whose weight is a 2-D float32 initializer
            read by it alone.
        config: ONNX Runtime's configuration (rtn), as the full-model quantizer would be given it.
        record: (the original op type, for the report: "Gemm" for a rewritten Gemm; the step's method).

    Returns:
        The report line of the layer (bytes before and after, the relative error of its weight) and its bytes now.
    """
    gather = node.op_type == "Gather"
    weight = node.inputs[0 if gather else 1]
    assert weight is not None and weight.const_value is not None and weight.name
    original = weight.const_value.numpy()
    attributes = [ir.serde.serialize_attribute(attr) for attr in node.attributes.values()]
    inputs = [(v.name or "") if v is not None else "" for v in node.inputs]
    source = onnx.helper.make_node(node.op_type, inputs, [o.name or "" for o in node.outputs], name=node.name or "")
    source.attribute.extend(attributes)
    quantizer = nbits.DefaultWeightOnlyQuantizer(config)
    made: onnx.NodeProto | None = None
    parts: dict[str, list[onnx.TensorProto]] = {}
    squares = [0.0, 0.0]  # of the error and of the weight, summed over the pieces
    for piece in _pieces(original.shape, gather):
        chunk = np.ascontiguousarray(original[piece] if gather else original[:, piece])
        alone = onnx.helper.make_graph([source], "int4", [], [], [onnx.numpy_helper.from_array(chunk, weight.name)])
        (made,) = quantizer.quantize(source, [alone])
        for init in alone.initializer[1:]:  # [0]: the float weight's copy
            kept = onnx.TensorProto()
            kept.CopyFrom(init)  # a message of its own: a part of `alone` would keep all of it (and the copy) alive
            parts.setdefault(init.name, []).append(kept)
        arrays = {init.name: ir.from_proto(init).numpy() for init in alone.initializer[1:]}
        decoded = dequantized(made, arrays)
        assert decoded is not None
        squares[0] += sum_squares(decoded - chunk)
        squares[1] += sum_squares(chunk)
    assert made is not None
    if not gather:  # the columns of every piece: N of the whole weight
        (attr,) = [a for a in made.attribute if a.name == "N"]
        attr.i = original.shape[1]
    tensors = {name: ir.serde.deserialize_tensor(_joined(pieces)) for name, pieces in parts.items()}
    known = {v.name: v for v in node.inputs if v is not None}
    for name, tensor in tensors.items():
        kind = ir.TensorType(tensor.dtype)
        known[name] = ir.Value(name=name, shape=ir.Shape(list(tensor.shape.numpy())), type=kind, const_value=tensor)
        graph.register_initializer(known[name])
    quantized = ir.node(
        made.op_type, [known[name] if name else None for name in made.input],
        attributes={a.name: onnx.helper.get_attribute_value(a) for a in made.attribute},
        domain=made.domain, name=made.name or None, num_outputs=len(made.output),
    )  # fmt: skip
    ir.convenience.replace_nodes_and_values(graph, node, [node], [quantized], node.outputs, quantized.outputs)
    graph.initializers.pop(weight.name)
    graph.opset_imports[_CONTRIB] = 1
    error = float(np.sqrt(squares[0] / squares[1])) if squares[1] else float(np.sqrt(squares[0]))
    op_type, method = record
    sizes = {name: tensor.nbytes for name, tensor in tensors.items()}
    before = (op_type, weight.name, tuple(original.shape))
    return layer_change(made, sizes, before, error, method, config.block_size)


def _pieces(shape: tuple[int, ...], gather: bool) -> list[slice]:
    """Slices of a weight quantized on their own with the same result: rows of a table, columns of a MatMul weight.

    A Gather's 4-bit levels are packed two a byte across its rows, so its pieces hold an even number of rows (the
    last excepted); a MatMul's column is packed on its own (blocks along K).
    """
    rows, cols = shape
    along, other = (rows, cols) if gather else (cols, rows)
    step = max(2, _PIECE_ELEMENTS // max(other, 1)) // 2 * 2
    return [slice(start, min(start + step, along)) for start in range(0, along, step)]


def _joined(pieces: list[onnx.TensorProto]) -> onnx.TensorProto:
    """One tensor from its pieces along the first dimension (raw bytes, packed or not, laid end to end)."""
    if len(pieces) == 1:
        return pieces[0]
    joined = onnx.TensorProto()
    joined.CopyFrom(pieces[0])
    assert all(piece.HasField("raw_data") for piece in pieces)
    joined.dims[0] = sum(piece.dims[0] for piece in pieces)
    joined.raw_data = b"".join(piece.raw_data for piece in pieces)
    return joined
