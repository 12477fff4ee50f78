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

from onnx_ops.passes._int4_layers import layer_change
from onnx_ops.report import LayerChange

__all__ = ["quantize_node"]

_CONTRIB = "com.microsoft"


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
    index = 0 if node.op_type == "Gather" else 1
    weight = node.inputs[index]
    assert weight is not None and weight.const_value is not None and weight.name
    original = weight.const_value.numpy()
    attributes = [ir.serde.serialize_attribute(attr) for attr in node.attributes.values()]
    inputs = [(v.name or "") if v is not None else "" for v in node.inputs]
    source = onnx.helper.make_node(node.op_type, inputs, [o.name or "" for o in node.outputs], name=node.name or "")
    source.attribute.extend(attributes)
    alone = onnx.helper.make_graph([source], "int4", [], [], [onnx.numpy_helper.from_array(original, weight.name)])
    (made,) = nbits.DefaultWeightOnlyQuantizer(config).quantize(source, [alone])
    del alone.initializer[0]  # the float weight's copy
    tensors = {init.name: ir.from_proto(init) for init in alone.initializer}
    known = {v.name: v for v in node.inputs if v is not None}
    for name, tensor in tensors.items():
        known[name] = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(known[name])
    quantized = ir.node(
        made.op_type, [known[name] if name else None for name in made.input],
        attributes={a.name: onnx.helper.get_attribute_value(a) for a in made.attribute},
        domain=made.domain, name=made.name or None, num_outputs=len(made.output),
    )  # fmt: skip
    ir.convenience.replace_nodes_and_values(graph, node, [node], [quantized], node.outputs, quantized.outputs)
    graph.initializers.pop(weight.name)
    graph.opset_imports[_CONTRIB] = 1
    arrays = {name: tensor.numpy() for name, tensor in tensors.items()}
    sizes = {name: tensor.nbytes for name, tensor in tensors.items()}
    op_type, method = record
    return layer_change(made, arrays, sizes, (op_type, weight.name, np.asarray(original)), method, config.block_size)
