"""4-bit embeddings (``embedding_bits: 4``) on models below opset 21, whose ops change form on the way up."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.passes._base import PassContext
from onnx_ops.passes.quantize import QuantizePass
from onnx_ops.plan import QuantizeStep

from helpers import run


def _pooled_embeddings(opset: int) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul -> ReduceMean over the tokens, with ``axes`` as an attribute (opset < 18)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "proj.W"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "proj.W"], ["y"], name="proj"),
        helper.make_node("ReduceMean", ["y"], ["pooled"], name="pool", axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "pooled_embeddings",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_4_bit_embeddings_raise_the_opset_with_reduce_axes_as_inputs(tmp_path):
    """MatMulNBitsQuantizer set opset 21 on a graph whose ReduceMean kept its axes attribute: the checker refused."""
    proto = _pooled_embeddings(13)
    step = QuantizeStep(embedding_bits=4, speed_check=False)
    qpass = QuantizePass(step, PassContext(workdir=tmp_path))
    model = ir.from_proto(proto)
    qpass.precheck(model)
    result = ir.to_proto(qpass(model).model)
    onnx.checker.check_model(result, full_check=True)
    ops = {node.op_type: node for node in result.graph.node}
    assert "GatherBlockQuantized" in ops and "MatMulInteger" in ops
    assert len(ops["ReduceMean"].input) == 2 and not ops["ReduceMean"].attribute[1:]  # axes moved to an input
    assert qpass.log.summary["opset_after"] == 21 and "upgraded 13 -> 21" in str(qpass.log.summary["embeddings_opset"])
    feeds = {"ids": (np.arange(8, dtype=np.int64) * 7 % 64)[None]}
    want, got = run(proto, feeds)[0].ravel(), run(result, feeds)[0].ravel()
    assert float(want @ got / np.linalg.norm(want) / np.linalg.norm(got)) > 0.97
