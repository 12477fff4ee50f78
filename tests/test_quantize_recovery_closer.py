"""Static int8 recovery "auto": a stage of layers is kept only if the calibration outputs get closer (real ORT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.capture import Session
from onnx_ops.passes.quantize import closer, exclusions, recovery
from onnx_ops.passes.quantize.qdq import QdqModel
from tests.test_quantize_recovery import _conv_model, _quantized, _smooth_images


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, onnx.ModelProto, list]:
    rng = np.random.default_rng(1)
    model = _conv_model(rng)
    calibration = [{"x": x} for x in _smooth_images(rng, 8)]
    return model, _quantized(model, calibration, tmp_path_factory.mktemp("q")), calibration


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def test_a_stage_that_moves_the_outputs_away_is_undone(setting: tuple) -> None:
    model, quantized, calibration = setting
    student = QdqModel(_copy(quantized))
    layers = student.layers()
    judge = exclusions.Exclusions(Session(model, ()), calibration, 0.995, 1)
    start = judge.cosine(student.proto)
    stored = closer.kept(student, layers)
    outcome = recovery.Outcome(layers=1, rounded=6, corrected=3, deltas={layers[0].node: [1, 1, 0, 0.5, 0.25]})
    outcome.gptq_error, outcome.nearest_error = 2.0, 4.0
    student.set_array(layers[0].weight, -stored[layers[0].weight])  # a "recovery" that ruins the layer
    closest = closer.keep_if_closer(student, layers, stored, judge, start, outcome)
    assert closest == start and outcome.undone == [layers[0].node] and outcome.stages == 1
    assert outcome.counts() == [5, 2, 0, 1.5, 3.75]  # the layer's share is taken out
    assert all(np.array_equal(student.array(name), value) for name, value in stored.items())
    assert judge.cosine(student.proto) == pytest.approx(start)
    assert "1 of 1 layers keep ONNX Runtime's rounding" in str(outcome.summary()["recovery_undone"])


def _two_convs(rng: np.random.Generator) -> onnx.ModelProto:
    """x [1, 8, 24, 24] -> Conv 3x3 (8 -> 16) -> Relu -> Conv 1x1 (16 -> 8) -> y."""
    first = (rng.normal(size=(16, 8, 3, 3)) * 0.2).astype(np.float32)
    second = (rng.normal(size=(8, 16, 1, 1)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="first", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="second"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 24, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 24, 24])],
        [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_stage_that_moves_the_outputs_away_is_undone_whole(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    model = _two_convs(rng)
    calibration = [{"x": x} for x in _smooth_images(rng, 6)]
    student = QdqModel(_quantized(model, calibration, tmp_path))
    first, second = student.layers()
    good = {name: student.array(name) for name in (first.weight, second.weight)}
    judge = exclusions.Exclusions(Session(model, ()), calibration, 0.995, 1)
    broken = np.roll(good[second.weight], 1, axis=0)  # the stage starts with `second`'s output channels shifted
    student.set_array(second.weight, broken)
    before = closer.kept(student, [first, second])
    start = judge.cosine(student.proto)
    # the stage's "recovery": `first` ruined, `second` mended; together the outputs move away
    student.set_array(first.weight, np.zeros_like(good[first.weight]))
    student.set_array(second.weight, good[second.weight])
    outcome = recovery.Outcome(layers=2, rounded=2, deltas={first.node: [1, 0, 0, 0, 0], second.node: [1, 0, 0, 0, 0]})
    assert judge.cosine(student.proto) < start
    closest = closer.keep_if_closer(student, [first, second], before, judge, start, outcome)
    assert outcome.undone == [first.node, second.node] and outcome.rounded == 0 and closest == start
    assert all(np.array_equal(student.array(name), value) for name, value in before.items())


def test_recovery_that_brings_the_outputs_closer_is_kept(setting: tuple) -> None:
    model, quantized, calibration = setting
    settings = recovery.Settings(max_float_layers=0.0, only_closer=True)
    _, outcome = recovery.recover(model, _copy(quantized), calibration, settings)
    assert outcome.undone == [] and outcome.stages == 1 and outcome.rounded == 1
    assert outcome.cosine_after is not None and outcome.cosine_before is not None
    assert outcome.cosine_after > outcome.cosine_before
    assert "recovery_undone" not in outcome.summary()


def test_the_quantize_step_judges_stages_only_when_recovery_is_auto(
    setting: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnx_ops.plan import QuantizeStep

    model, _, calibration = setting
    source, target = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, source)
    judged: list[bool] = []
    original = recovery.recover
    monkeypatch.setattr(recovery, "recover", lambda *a: (judged.append(a[3].only_closer), original(*a))[1])
    for recover in ("auto", "on"):
        onnx.save(_quantized(model, calibration, tmp_path), target)
        log = type("Log", (), {"warnings": [], "summary": {}})()
        step = QuantizeStep(kind="quantize", mode="static", recovery=recover)  # type: ignore[arg-type]
        recovery.recover_file(source, target, step, calibration, log, str)  # type: ignore[arg-type]
        assert not log.warnings and log.summary["recovery_layers"] == 1  # type: ignore[attr-defined]
    assert judged == [True, False]
