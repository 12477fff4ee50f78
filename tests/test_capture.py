"""Activation capture: sampled im2col patches against ONNX Runtime's own Conv, and the statistics built from them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.capture import ConvGeometry, Layer, LayerStats, Session, capture
from onnx_ops.capture_graph import keep_ancestors
from onnx_ops.im2col import outputs_at, patches, sample_positions

# (input shape, Cout, kernel, attributes): pads, strides, dilations, groups, depthwise, auto_pad, 1-D and 3-D.
_CASES = [
    ((2, 3, 11, 9), 8, (3, 3), {"pads": [1, 1, 1, 1]}),
    ((1, 4, 13, 10), 6, (3, 2), {"pads": [2, 0, 1, 1], "strides": [2, 3]}),
    ((1, 4, 12, 12), 4, (3, 3), {"dilations": [2, 3], "pads": [2, 3, 2, 3]}),
    ((2, 6, 9, 9), 9, (3, 3), {"group": 3, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ((1, 5, 10, 8), 5, (3, 3), {"group": 5, "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((1, 4, 10, 7), 8, (4, 4), {"auto_pad": "SAME_LOWER", "strides": [3, 2]}),
    ((1, 3, 8, 8), 4, (2, 2), {"auto_pad": "VALID"}),
    ((3, 2, 40), 5, (5,), {"pads": [2, 1], "strides": [3]}),
    ((1, 2, 5, 6, 5), 3, (2, 3, 2), {"pads": [1, 0, 1, 0, 1, 1], "strides": [1, 2, 2]}),
]


def _conv(shape: tuple[int, ...], cout: int, kernel: tuple[int, ...], attrs: dict[str, object]) -> onnx.ModelProto:
    rng = np.random.default_rng(len(shape) + cout)
    groups = int(attrs.get("group", 1))  # type: ignore[call-overload]
    w = rng.standard_normal((cout, shape[1] // groups, *kernel)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _geometry(model: onnx.ModelProto) -> ConvGeometry:
    node = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return ConvGeometry.from_attributes(attrs, tuple(model.graph.initializer[0].dims))


@pytest.mark.parametrize(("shape", "cout", "kernel", "attrs"), _CASES)
def test_patches_times_weight_is_onnx_runtimes_conv_output(
    shape: tuple[int, ...], cout: int, kernel: tuple[int, ...], attrs: dict[str, object]
) -> None:
    model = _conv(shape, cout, kernel, attrs)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    geometry = _geometry(model)
    assert geometry.output_shape(shape[2:]) == y.shape[2:]
    w, b = (numpy_helper.to_array(t) for t in model.graph.initializer)
    g = geometry.groups
    positions = sample_positions(y.shape[0], y.shape[2:], 40, np.random.default_rng(2))
    assert len(positions) == min(40, y.size // cout) and len(np.unique(positions)) == len(positions)
    p = patches(x, geometry, positions)  # [P, g, Cin/g * taps]
    wg = w.reshape(g, cout // g, -1)  # [g, Cout/g, Cin/g * taps]
    got = np.einsum("pgk,gnk->pgn", p, wg) + b.reshape(g, -1)
    np.testing.assert_allclose(got, outputs_at(y, positions, g), rtol=1e-4, atol=1e-4)


def test_capture_conv_statistics_are_bounded_and_solve_back_to_the_weights() -> None:
    """Every Conv position cap holds for a large image, and X^T X / X^T Y give back W (with its bias)."""
    shape, cout, kernel, attrs = (2, 3, 64, 64), 4, (3, 3), {"pads": [1, 1, 1, 1]}
    model = _conv(shape, cout, kernel, attrs)
    feeds = [{"x": np.random.default_rng(s).standard_normal(shape).astype(np.float32)} for s in range(3)]
    layer = Layer("conv", input="x", output="y", k=27, n=cout, conv=_geometry(model))
    stats, error = capture(model, None, [layer], feeds, positions=50)
    s = stats["conv"]
    assert s.rows == 150 and s.xtx.shape == (28, 28) and error.squared_error == 0.0
    solved = np.linalg.solve(s.xtx, s.xty)  # [k + 1, n]: weights then bias
    w, b = (numpy_helper.to_array(t) for t in model.graph.initializer)
    np.testing.assert_allclose(solved[:-1].T, w.reshape(cout, -1), atol=1e-3)
    np.testing.assert_allclose(solved[-1], b, atol=1e-3)
    assert s.squared_error(solved) < 1e-6 * s.yty.sum()
    assert s.input_norms().shape == (27,)


def test_capture_depthwise_conv_has_statistics_per_group() -> None:
    shape, attrs = (1, 6, 12, 12), {"group": 6, "pads": [1, 1, 1, 1]}
    model = _conv(shape, 6, (3, 3), attrs)
    feeds = [{"x": np.random.default_rng(s).standard_normal(shape).astype(np.float32)} for s in range(2)]
    layer = Layer("dw", input="x", output="y", k=9, n=1, conv=_geometry(model))
    s = capture(model, None, [layer], feeds, positions=64)[0]["dw"]
    assert s.groups == 6 and s.xtx.shape == (6, 10, 10) and s.xty.shape == (6, 10, 1) and s.yty.shape == (6, 1)
    w, b = (numpy_helper.to_array(t) for t in model.graph.initializer)
    for g in range(6):
        one = s.group(g)
        solved = np.linalg.solve(one.xtx, one.xty)
        np.testing.assert_allclose(solved[:-1, 0], w[g].ravel(), atol=1e-3)
        np.testing.assert_allclose(solved[-1, 0], b[g], atol=1e-3)
    assert isinstance(s.group(0), LayerStats) and s.input_norms().shape == (6, 9)


def test_a_session_of_only_the_needed_nodes_captures_the_same_statistics() -> None:
    """model_error=False runs only the nodes up to the layers' tensors: same statistics, no model error."""
    from tests import models

    teacher, student = models.mlp(seed=0), models.mlp(seed=1)
    layers = [Layer("fc1", input="h0", output="z1", k=128, n=128)]
    feeds = [{"x": np.random.default_rng(s).standard_normal((4, 64)).astype(np.float32)} for s in range(3)]
    full, error = capture(teacher, student, layers, feeds)
    part, none = capture(teacher, student, layers, feeds, model_error=False)
    np.testing.assert_allclose(part["fc1"].xtx, full["fc1"].xtx, rtol=1e-12)
    np.testing.assert_allclose(part["fc1"].xty, full["fc1"].xty, rtol=1e-12)
    assert error.relative > 0.1 and none.squared_error == none.reference == 0.0
    session = Session(student, ["h0"], only_extra=True)
    assert session.names == ["h0"] and session.model_outputs == []
    graph = onnx.GraphProto()
    graph.CopyFrom(student.graph)
    keep_ancestors(graph, ["h0"])
    assert [n.name for n in graph.node] == ["fc0", "bias0", "relu0"] and not graph.output
