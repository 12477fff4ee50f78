"""Does ONNX Runtime fold a clustered weight's decoder at load? Asked one weight at a time.

Loading the whole clustered model in ONNX Runtime to see its optimized graph holds every decoded weight at once
(about 2.5x the float weights, beside the pass's own copy). ONNX Runtime folds a node when all its inputs are
constants, whatever else the graph holds, so each decoder is asked alone: a model of its nodes and constants whose
decoded weight is added to a graph input (so that the decoded value is used, as in the full model). The largest
model ONNX Runtime loads is then one weight's.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from onnx_ops.passes.optimize import ort_basic_optimized

__all__ = ["folds_alone"]


def folds_alone(decoder: list[ir.Node], opsets: dict[str, int], workdir: Path) -> bool:
    """True when ONNX Runtime's basic optimizer folds every node of `decoder` (a weight's decoding, last node last).

    Args:
        decoder: The nodes decoding one weight, in order; the last one's output is the float weight.
        opsets: The model's opset imports.
        workdir: A private directory for the files.

    Raises:
        PassFailedError: ONNX Runtime could not load the decoder.
    """
    out = decoder[-1].outputs[0]
    names = {o.name for node in decoder for o in node.outputs}
    constants: dict[str, ir.TensorProtocol] = {}
    for node in decoder:
        for value in node.inputs:
            if value is not None and value.name not in names and value.const_value is not None:
                constants[value.name or ""] = value.const_value
    shape = [int(d) for d in out.shape.numpy()] if out.shape is not None else None
    weight = onnx.helper.make_tensor_value_info(out.name or "", onnx.TensorProto.FLOAT, shape)
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in decoder]
        + [onnx.helper.make_node("Add", ["decoder_probe", out.name or ""], ["decoder_probe_sum"])],
        "decoder",
        [onnx.helper.make_tensor_value_info("decoder_probe", onnx.TensorProto.FLOAT, shape)],
        [onnx.helper.make_tensor_value_info("decoder_probe_sum", onnx.TensorProto.FLOAT, shape)],
        [ir.serde.serialize_tensor(tensor) for tensor in constants.values()],
        value_info=[weight],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    model = ir.from_proto(proto)
    del proto, graph
    path, _ = ort_basic_optimized(model, workdir, keep_weights_outside=True)
    try:
        nodes = onnx.load(path, load_external_data=False).graph.node
        made = {name for node in nodes for name in node.output}
    finally:
        path.unlink(missing_ok=True)
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)
    return not (made & names)  # folded: no node left computes any part of the decoding
