"""The teacher recorded once (capture_targets) gives what capture runs of teacher and student together give."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes import common

from onnx_ops import capture as capture_module
from onnx_ops.capture import ConvGeometry, Layer, LayerStats, Session, capture, capture_rows, output_error
from onnx_ops.capture_files import ModelFile, write_proto
from onnx_ops.capture_targets import Targets
from onnx_ops.passes._layers import Linear, is_linear, linear
from tests import real_models


def _net() -> onnx.ModelProto:
    """Tokens [B, S, 6] -> MatMul+bias -> Relu -> MatMul, beside images -> Conv -> grouped Conv (two outputs)."""
    rng = np.random.default_rng(0)
    weights = {
        "w0": rng.standard_normal((6, 8)),
        "b0": rng.standard_normal(8),
        "w1": rng.standard_normal((8, 5)),
        "c0": rng.standard_normal((8, 3, 3, 3)),
        "c1": rng.standard_normal((8, 2, 3, 3)),
    }
    nodes = [
        helper.make_node("MatMul", ["tokens", "w0"], ["m0"], name="fc0"),
        helper.make_node("Add", ["m0", "b0"], ["a0"], name="bias0"),
        helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
        helper.make_node("MatMul", ["r0", "w1"], ["out"], name="fc1"),
        helper.make_node("Conv", ["image", "c0"], ["v0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["v0"], ["s0"], name="relu1"),
        helper.make_node("Conv", ["s0", "c1"], ["pic"], name="conv1", group=4, strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "two",
        [
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["B", "S", 6]),
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, 9, 9]),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", 5]),
            helper.make_tensor_value_info("pic", TensorProto.FLOAT, None),
        ],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _layers() -> dict[str, Layer]:
    conv0 = ConvGeometry.from_attributes({"pads": [1, 1, 1, 1]}, (8, 3, 3, 3))
    conv1 = ConvGeometry.from_attributes({"group": 4, "strides": [2, 2]}, (8, 2, 3, 3))
    return {
        "fc0": Layer("fc0", "tokens", "a0", 6, 8),
        "fc1": Layer("fc1", "r0", "out", 8, 5),
        "conv0": Layer("conv0", "image", "v0", 27, 8, conv0),
        "conv1": Layer("conv1", "s0", "pic", 18, 2, conv1),
    }


def _pruned(model: onnx.ModelProto, names: set[str] | None = None) -> onnx.ModelProto:
    """Half of every weight matrix (or of those named) zeroed, its smaller half; the biases kept."""
    student = onnx.ModelProto()
    student.CopyFrom(model)
    for tensor in student.graph.initializer:
        array = numpy_helper.to_array(tensor) if names is None or tensor.name in names else np.zeros(0)
        if array.ndim >= 2:
            array = np.where(np.abs(array) < np.median(np.abs(array)), 0.0, array).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return student


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    """Padded token batches with their attention mask (not a model input), and images."""
    rng = np.random.default_rng(1)
    feeds = []
    for _ in range(count):
        mask = np.ones((2, 7), dtype=np.int64)
        mask[0, rng.integers(2, 7) :] = 0
        tokens = rng.standard_normal((2, 7, 6)).astype(np.float32)
        feeds.append({"tokens": tokens, "image": rng.standard_normal((2, 3, 9, 9)).astype(np.float32), "mask": mask})
    return feeds


def _assert_same(found: LayerStats, expected: LayerStats) -> None:
    assert found.rows == expected.rows and len(found.folds) == len(expected.folds)
    for one, other in [(found, expected), *zip(found.folds, expected.folds, strict=True)]:
        for name in ("xtx", "xty", "yty"):
            # float32 round-off only: ONNX Runtime fuses differently when other tensors are graph outputs
            scale = float(np.abs(getattr(other, name)).max(initial=0.0))
            np.testing.assert_allclose(
                getattr(one, name), getattr(other, name), rtol=1e-5, atol=1e-5 * scale, err_msg=name
            )


def _check(
    teacher: onnx.ModelProto, student: onnx.ModelProto, groups: list[list[Layer]], feeds: list, tmp: Path
) -> None:
    """Every group's recorded capture against capture(), the first with the model-output error."""
    outputs = [la.output for group in groups for la in group]
    recorded = Targets.record(Session(teacher, outputs), groups, feeds, tmp / "targets.bin", positions=10)
    path = write_proto(student, tmp / "student.onnx")
    for number, group in enumerate(groups):
        first = number == 0
        session = Session(path, [la.input for la in group], only_extra=not first)
        found, error = recorded.capture(session, number, feeds, folds=2, model_error=first)
        expected, expected_error = capture(teacher, student, group, feeds, positions=10, folds=2, model_error=first)
        assert found.keys() == expected.keys()
        for name in found:
            _assert_same(found[name], expected[name])
        assert error.squared_error == pytest.approx(expected_error.squared_error, rel=1e-9)
        assert error.reference == pytest.approx(expected_error.reference, rel=1e-9)
    assert recorded.model_outputs
    files = sorted(tmp.glob("targets.bin.*"))
    assert len(files) == len(groups) + 1  # one per group and one for the model outputs
    recorded.drop(0)
    assert sorted(tmp.glob("targets.bin.*")) == files[1:]


def test_recorded_teacher_gives_the_model_output_error(tmp_path: Path) -> None:
    teacher, student, feeds = _net(), _pruned(_net()), _feeds(3)
    recorded = Targets.record(Session(teacher, ()), [], feeds, tmp_path / "targets.bin")
    found = recorded.output_error(Session(write_proto(student, tmp_path / "student.onnx"), ()), feeds)
    expected = output_error(teacher, student, feeds)
    assert found.relative == pytest.approx(expected.relative, rel=1e-9) and expected.relative > 0


def test_recorded_teacher_gives_captures_statistics_masked_rows_and_sampled_conv_positions(tmp_path: Path) -> None:
    teacher = _net()
    layers = _layers()
    # Two conv layers in one run: the second's positions depend on the first's draw from the same generator.
    groups = [[layers["fc0"], layers["conv0"], layers["conv1"]], [layers["fc1"]], [layers["conv1"], layers["fc0"]]]
    _check(teacher, _pruned(teacher), groups, _feeds(5), tmp_path)


def test_recorded_rows_are_capture_rows(tmp_path: Path) -> None:
    teacher, student, feeds = _net(), _pruned(_net()), _feeds(4)
    layer = _layers()["fc1"]
    recorded = Targets.record(Session(teacher, ["out"]), [[layer]], feeds, tmp_path / "t.bin")
    path = write_proto(student, tmp_path / "student.onnx")
    found, origin = recorded.rows(Session(path, ["r0", "out"], only_extra=True), ["r0", "out"], layer, feeds)
    expected, expected_origin = capture_rows(Session(teacher, ["out"]), student, ["r0", "out"], ["out"], feeds)
    np.testing.assert_array_equal(origin, expected_origin)
    assert found.keys() == expected.keys()
    for name in found:
        np.testing.assert_allclose(found[name], expected[name], rtol=1e-6, err_msg=name)


def test_a_model_file_rewrites_changed_weights_in_place(tmp_path: Path) -> None:
    model = ir.from_proto(_net())
    written = ModelFile(model, tmp_path)
    feed = _feeds(1)[0]
    weights = model.graph.initializers
    rng = np.random.default_rng(5)
    for name in ("w1", "b0", "c1"):  # b0 (32 bytes) is kept in the model file itself
        value = weights[name]
        value.const_value = ir.tensor(rng.standard_normal(value.const_value.shape.numpy()).astype(np.float32))
    before = Session(written.path, ()).run(feed)
    written.update([weights["w1"], weights["b0"], weights["c1"]])
    after = Session(written.path, ()).run(feed)
    expected = Session(ir.to_proto(model), ()).run(feed)
    for name in ("out", "pic"):
        assert not np.allclose(before[name], expected[name])
        np.testing.assert_array_equal(after[name], expected[name])
    with pytest.raises(ValueError, match="changed size"):
        weights["w1"].const_value = ir.tensor(np.zeros((8, 4), np.float32))
        written.update([weights["w1"]])


@pytest.mark.realmodel
def test_recorded_teacher_on_a_real_text_recognizer(tmp_path: Path) -> None:
    """PP-OCRv4's recognizer: its first Convs (sampled patches, one grouped) and MatMuls, two capture runs."""
    path = real_models.locate("rapidocr_rec")
    if path is None:
        pytest.skip("rapidocr_rec is not installed (pip install --no-deps -r requirements-real-models.txt)")
    teacher = onnx.load(str(path))
    model = ir.from_proto(teacher)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common.RemoveInitializersFromInputsPass()(model)
    teacher = ir.to_proto(model)
    found = [linear(node) for node in model.graph if is_linear(node)]
    convs = [f for f in found if isinstance(f, Linear) and f.layer.conv is not None][:3]
    matmuls = [f for f in found if isinstance(f, Linear) and f.layer.conv is None][:2]
    assert len(convs) == 3 and len(matmuls) == 2 and any(c.layer.groups > 1 for c in convs)
    student = _pruned(teacher, {f.weight.name or "" for f in [*convs, *matmuls]})
    feeds = real_models.sample_feeds("rapidocr_rec", 2, seed=3)
    _check(teacher, student, [[c.layer for c in convs], [m.layer for m in matmuls]], feeds, tmp_path)


def test_a_large_model_proto_builds_its_session_from_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    model, feed = _net(), _feeds(1)[0]
    expected = Session(model, ["r0"], only_extra=True).run(feed)
    monkeypatch.setattr(capture_module, "FILE_BYTES", 0)  # every model is "large"
    monkeypatch.setattr(capture_module, "_file_session", _counted(capture_module._file_session))
    for source in (model, ir.from_proto(model)):  # a proto, and an IR model written without a proto
        found = Session(source, ["r0"], only_extra=True).run(feed)
        assert found.keys() == expected.keys() == {"r0"}
        np.testing.assert_array_equal(found["r0"], expected["r0"])
    assert _counted.calls == 2


def _counted(function: Callable[..., ort.InferenceSession]) -> Callable[..., ort.InferenceSession]:
    def wrapper(*args: object) -> ort.InferenceSession:
        _counted.calls += 1  # type: ignore[attr-defined]
        return function(*args)

    _counted.calls = 0  # type: ignore[attr-defined]
    return wrapper
