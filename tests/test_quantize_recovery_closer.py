"""Static int8 recovery "auto": a stage of layers is kept only if the calibration outputs get closer (real ORT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_ops.capture import Session
from onnx_ops.passes.quantize import exclusions, recovery
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
    stored = {name: student.array(name) for name in (layers[0].weight, layers[0].bias)}
    outcome = recovery.Outcome(layers=1, rounded=5, corrected=2)
    kept = recovery._kept(student, layers, outcome)
    outcome.rounded, outcome.corrected = 6, 3  # what recovering the stage counted
    student.set_array(layers[0].weight, -stored[layers[0].weight])  # a "recovery" that ruins the layer
    closest = recovery._keep_if_closer(student, layers, kept, judge, start, outcome)
    assert closest == start and outcome.undone == [layers[0].node] and outcome.stages == 1
    assert (outcome.rounded, outcome.corrected) == (5, 2)
    assert all(np.array_equal(student.array(name), value) for name, value in stored.items())
    assert judge.cosine(student.proto) == pytest.approx(start)
    assert "1 of 1 layers keep ONNX Runtime's rounding" in str(outcome.summary()["recovery_undone"])


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
