"""The cluster pass asks ONNX Runtime, one decoder at a time, whether it folds the decoding at load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnx_ops.passes._cluster_folding import folds_alone


def _const(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                    const_value=ir.tensor(array, name=name))  # fmt: skip


def _decoder(op: str) -> list[ir.Node]:
    levels = _const("levels", np.arange(64, dtype=np.int8).reshape(8, 8))
    if op == "Gather":
        table = _const("codebook", np.linspace(-1, 1, 64, dtype=np.float32))
        wide = ir.node("Cast", [levels], attributes={"to": ir.DataType.INT32}, name="w_idx0_int32")
        nodes = [wide, ir.node("Gather", [table, wide.outputs[0]], attributes={"axis": 0}, name="w_decode")]
    else:  # ONNX Runtime keeps DequantizeLinear unfolded (its QDQ graphs rely on it)
        scale = _const("scale", np.asarray(0.5, np.float32))
        nodes = [ir.node("DequantizeLinear", [levels, scale], name="w_decode")]
    for node in nodes:
        node.outputs[0].name = node.name
    out = nodes[-1].outputs[0]
    out.shape, out.type = ir.Shape([8, 8]), ir.TensorType(ir.DataType.FLOAT)
    return nodes


def test_a_decoder_onnxruntime_folds_and_one_it_keeps(tmp_path: Path) -> None:
    assert folds_alone(_decoder("Gather"), {"": 17}, tmp_path) is True
    assert folds_alone(_decoder("DequantizeLinear"), {"": 17}, tmp_path) is False
    assert not list(tmp_path.iterdir())  # its files are removed
