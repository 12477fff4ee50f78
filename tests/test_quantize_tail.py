"""Static int8 leaves the output tail (nodes after the last weight layer) in float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.capture import Session
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.quantize import QuantizePass
from onnx_ops.passes.quantize.tail import output_tail
from onnx_ops.plan import QuantizeStep


def _detector_head(rng: np.random.Generator) -> onnx.ModelProto:
    """A YOLOX-like head: box offsets in the hundreds and a sigmoid score near zero, concatenated as output."""
    w1 = rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)
    boxes = rng.normal(0, 30.0, (4, 8, 1, 1)).astype(np.float32)
    score = rng.normal(0, 0.1, (1, 8, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "boxes"], ["b"], name="box_conv"),
        helper.make_node("Conv", ["r", "score", "shift"], ["s"], name="score_conv"),
        helper.make_node("Sigmoid", ["s"], ["p"], name="sigmoid"),
        helper.make_node("Concat", ["b", "p"], ["c"], name="concat", axis=1),
        helper.make_node("Reshape", ["c", "shape"], ["y"], name="reshape"),
    ]
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(boxes, "boxes"),
        numpy_helper.from_array(score, "score"),
        numpy_helper.from_array(np.array([-5.0], np.float32), "shift"),
        numpy_helper.from_array(np.array([1, 5, -1], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_output_tail_is_what_follows_the_last_weight_layer() -> None:
    proto = _detector_head(np.random.default_rng(0))
    assert output_tail(proto.graph) == ["sigmoid", "concat", "reshape"]
    no_weights = onnx.helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )  # fmt: skip
    assert output_tail(no_weights) == []


def _score_error(proto: onnx.ModelProto, step: QuantizeStep, feeds: list, workdir: Path) -> tuple[float, list[str]]:
    """Worst absolute error of the score row against float, and the op types of the quantized model's nodes."""
    workdir.mkdir()
    result = ir.to_proto(
        QuantizePass(step, PassContext(workdir=workdir, calibration=feeds))(ir.from_proto(proto)).model
    )
    want, got = Session(proto, (), 1), Session(result, (), 1)
    errors = [np.abs(want.run(f)["y"][0, 4] - got.run(f)["y"][0, 4]).max() for f in feeds]
    readers = [n.op_type for n in result.graph.node if "y" in n.output]
    return float(max(errors)), readers


def test_static_int8_keeps_the_detector_scores_in_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    proto = _detector_head(rng)
    feeds = [{"x": rng.normal(size=(1, 4, 16, 16)).astype(np.float32)} for _ in range(6)]
    common = {"mode": "static", "recovery": "off", "preprocess": "off", "fold_affine": False}
    left, left_writer = _score_error(proto, QuantizeStep(**common), feeds, tmp_path / "left")
    # The same model with the tail quantized, as ONNX Runtime does when told to quantize these op types.
    every = QuantizeStep(**common, op_types=["Conv", "Sigmoid", "Concat", "Reshape"])
    quantized, quantized_writer = _score_error(proto, every, feeds, tmp_path / "all")
    assert left_writer == ["Reshape"] and quantized_writer == ["DequantizeLinear"]
    # The scores (about 0.007) shared a scale with box offsets in the hundreds: rounded to nothing.
    assert quantized > 10 * left
