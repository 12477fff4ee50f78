"""Static int8 recovery on a small Conv model quantized by ONNX Runtime: real ORT runs, no timing."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime import quantization as ortq

from onnx_ops.capture import Session
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.quantize import QuantizePass, recovery
from onnx_ops.passes.quantize.qdq import QdqModel
from onnx_ops.passes.quantize.rounding import gptq_levels, layer_error, nearest_levels
from onnx_ops.plan import QuantizeStep


def _smooth_images(rng: np.random.Generator, count: int, channels: int = 8, size: int = 24) -> list[np.ndarray]:
    """Images whose neighbouring pixels and channels are correlated (as in natural images)."""
    images = []
    for _ in range(count):
        base = rng.normal(size=(1, 1, size + 4, size + 4))
        for axis in (2, 3):
            base = np.apply_along_axis(lambda v: np.convolve(v, np.ones(5) / 5, "same"), axis, base)
        mix = rng.normal(size=(channels, 1, 1)) * 0.5 + 1.0
        noise = rng.normal(size=(1, channels, size + 4, size + 4)) * 0.05
        images.append((base * mix + noise + 1.0)[:, :, 2:-2, 2:-2].astype(np.float32))  # post-ReLU-like mean
    return images


def _conv_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x [1, 8, 24, 24] -> Conv 3x3 (8 -> 32) -> y."""
    weight = (rng.normal(size=(32, 8, 3, 3)) * 0.2).astype(np.float32)
    bias = (rng.normal(size=32) * 0.1).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 24, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 24, 24])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _quantized(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], workdir: Path) -> onnx.ModelProto:
    source, target = workdir / "float.onnx", workdir / "qdq.onnx"
    onnx.save(model, source)

    class Reader(ortq.CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    with contextlib.redirect_stdout(io.StringIO()):
        ortq.quantize_static(str(source), str(target), Reader(), quant_format=ortq.QuantFormat.QDQ, per_channel=True)
    return onnx.load(target)


def _errors(teacher: onnx.ModelProto, student: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The student Conv's output (before it is quantized again) minus the float Conv's on the same input.

    Both run in ONNX Runtime: the float model is fed the student's dequantized activation, so the difference
    is what the int8 weight (and bias) change, not the input's own quantization.
    """
    (layer,) = QdqModel(student).layers()
    want, got = Session(teacher, ()), Session(student, (layer.activation, layer.output))
    errors = []
    for feed in feeds:
        found = got.run(feed)
        errors.append(found[layer.output] - want.run({"x": found[layer.activation]})["y"])
    return np.stack(errors)


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, onnx.ModelProto, list, list]:
    rng = np.random.default_rng(0)
    model = _conv_model(rng)
    calibration = [{"x": x} for x in _smooth_images(rng, 12)]
    held_out = [{"x": x} for x in _smooth_images(rng, 6)]
    return model, _quantized(model, calibration, tmp_path_factory.mktemp("q")), calibration, held_out


def _recovered(setting: tuple, rounding: str, bias: bool) -> onnx.ModelProto:
    model, quantized, calibration, _ = setting
    copy = onnx.ModelProto()
    copy.CopyFrom(quantized)
    settings = recovery.Settings(rounding=rounding, bias_correction=bias, max_float_layers=0.0)
    proto, outcome = recovery.recover(model, copy, calibration, settings)
    assert outcome.layers == 1
    return proto


def test_gptq_rounding_lowers_the_output_error_of_ort_round_to_nearest(setting: tuple) -> None:
    model, quantized, _, held_out = setting
    nearest = _errors(model, quantized, held_out)
    rounded = _errors(model, _recovered(setting, "gptq", False), held_out)
    ratio = np.sum(rounded**2) / np.sum(nearest**2)
    assert ratio < 0.1, ratio  # measured 0.038: 26x less squared error than ORT's round-to-nearest


def test_gptq_keeps_ort_scales_and_changes_only_int8_levels(setting: tuple) -> None:
    _, quantized, _, _ = setting
    before, after = QdqModel(quantized), QdqModel(_recovered(setting, "gptq", False))
    (layer,) = after.layers()
    assert np.array_equal(before.array(layer.weight_scale), after.array(layer.weight_scale))
    levels = after.array(layer.weight)
    assert levels.dtype == np.int8 and np.abs(levels.astype(int)).max() <= 127
    assert not np.array_equal(levels, before.array(layer.weight))


def test_bias_correction_brings_the_mean_output_error_to_zero(setting: tuple) -> None:
    model, quantized, calibration, held_out = setting
    corrected = _recovered(setting, "nearest", True)
    for feeds, factor in ((calibration, 0.01), (held_out, 0.1)):  # measured 0.002 and 0.028
        before = _errors(model, quantized, feeds).mean(axis=(0, 1, 3, 4))  # per output channel
        after = _errors(model, corrected, feeds).mean(axis=(0, 1, 3, 4))
        assert np.abs(after).mean() < factor * np.abs(before).mean(), (np.abs(after).mean(), np.abs(before).mean())
    (layer,) = QdqModel(corrected).layers()
    assert not np.array_equal(QdqModel(corrected).array(layer.bias), QdqModel(quantized).array(layer.bias))


def test_gptq_solver_beats_nearest_on_correlated_inputs() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 4)) @ rng.normal(size=(4, 16)) + 0.05 * rng.normal(size=(2000, 16))
    w = rng.normal(size=(8, 16))
    h = x.T @ x
    scale, zero = np.abs(w).max(axis=1) / 127, np.zeros(8)
    near = nearest_levels(w, scale, zero, (-127, 127))
    gptq = gptq_levels(w, h, scale, zero, (-127, 127))
    assert np.all(np.abs(gptq) <= 127) and np.array_equal(gptq, np.round(gptq))
    assert layer_error(w - gptq * scale[:, None], h) < 0.5 * layer_error(w - near * scale[:, None], h)


def test_static_quantize_step_recovers_by_default_and_reports_it(setting: tuple, tmp_path: Path) -> None:
    model, _, calibration, held_out = setting
    outputs = {}
    for mode in ("auto", "off"):
        step = QuantizeStep(mode="static", recovery=mode, speed_check=False)
        qpass = QuantizePass(step, PassContext(workdir=tmp_path / mode, calibration=calibration))
        (tmp_path / mode).mkdir()
        proto = ir.to_proto(qpass(ir.from_proto(model)).model)
        outputs[mode] = (proto, qpass.log.summary)
    summary = outputs["auto"][1]
    assert summary["recovery_layers"] == 1 and str(summary["recovery_rounding"]).startswith("gptq on 1 layers")
    assert "recovery_layers" not in outputs["off"][1]
    want = Session(model, ())
    errors = {
        mode: sum(float(np.sum((Session(proto, ()).run(f)["y"] - want.run(f)["y"]) ** 2)) for f in held_out)
        for mode, (proto, _) in outputs.items()
    }
    assert errors["auto"] < errors["off"], errors


def test_max_float_layers_puts_the_most_harmful_layer_back_in_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    first, second = _conv_model(rng), _conv_model(rng)
    # Two Convs in a row: x -> conv (8 -> 32) -> Slice to 8 channels -> conv2 (8 -> 32) -> y.
    graph = first.graph
    graph.node[0].output[0] = "h"
    starts, ends, axes = (
        numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((0, "s"), (8, "e"), (1, "a"))
    )
    graph.initializer.extend([starts, ends, axes])
    graph.initializer.extend(
        numpy_helper.from_array(numpy_helper.to_array(i), f"{i.name}2") for i in second.graph.initializer
    )
    graph.node.extend([
        helper.make_node("Slice", ["h", "s", "e", "a"], ["h8"], name="slice"),
        helper.make_node("Conv", ["h8", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ])  # fmt: skip
    calibration = [{"x": x} for x in _smooth_images(rng, 8)]
    quantized = _quantized(first, calibration, tmp_path)
    settings = recovery.Settings(max_float_layers=0.5, output_cosine=1.0)
    proto, outcome = recovery.recover(first, quantized, calibration, settings)
    assert len(outcome.float_layers) == 1 and outcome.cosine_after > outcome.cosine_before
    (kept,) = QdqModel(proto).layers()
    assert kept.node != outcome.float_layers[0]
    node = next(n for n in proto.graph.node if n.name == outcome.float_layers[0])
    assert {i.name: i.data_type for i in proto.graph.initializer}[node.input[1]] == TensorProto.FLOAT
