"""compress() end to end: plans refused before work, figures in the report checked independently."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_ops import (
    CompressionResult,
    DataError,
    InvalidModelError,
    PlanError,
    Report,
    ResourceLimitError,
    compress,
    parse_plan,
)

import models
from helpers import run

FAST = {"latency_runs": 5, "warmup_runs": 1}


def _plan(*steps: dict, **extra) -> dict:
    return {"steps": list(steps), "evaluation": FAST, **extra}


def _params(model: onnx.ModelProto) -> tuple[int, int]:
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    return sum(a.size for a in arrays), sum(int(a.size - np.count_nonzero(a)) for a in arrays)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"steps": []}, "at least 1"),
        ({"steps": [{"kind": "zip"}]}, "kind"),
        ({"steps": [{"kind": "quantize"}, {"kind": "svd"}]}, "quantize must be the last step"),
        ({"steps": [{"kind": "quantize"}, {"kind": "quantize"}]}, "only once"),
        ({"steps": [{"kind": "svd", "rank": 4, "energy": 0.9}]}, "only one of rank, rank_ratio, energy"),
        ({"steps": [{"kind": "prune", "method": "n:m", "n": 4, "m": 4}]}, "n < m"),
        ({"steps": [{"kind": "prune", "sparsity": 1.5}]}, "sparsity"),
        ({"steps": [{"kind": "prune", "typo_field": 1}]}, "typo_field"),
        ('{"steps": [', "invalid plan"),
    ],
)
def test_impossible_plans_are_refused_with_reason(plan, message):
    with pytest.raises(PlanError, match=message):
        parse_plan(plan)


def test_a_step_that_runs_out_of_memory_fails_as_out_of_memory_not_as_an_empty_pass_failure(monkeypatch):
    # A MemoryError has no text: wrapped as a pass failure it read "step 1 (prune) failed: " (code pass_failed).
    from onnx_ops.passes import prune

    def exhausted(self, model):
        raise MemoryError()

    monkeypatch.setattr(prune.MagnitudePrunePass, "call", exhausted)
    with pytest.raises(ResourceLimitError, match=r"step 1 \(prune\) ran out of memory") as caught:
        compress(models.mlp(), _plan({"kind": "prune", "sparsity": 0.5}))
    assert caught.value.code == "out_of_memory"


def test_static_quantization_without_calibration_is_refused_before_work():
    with pytest.raises(PlanError, match="static quantization needs calibration data.*x"):
        compress(models.mlp(), _plan({"kind": "quantize", "mode": "static"}))


def test_svd_on_model_without_matmul_is_refused():
    with pytest.raises(PlanError, match="svd"):
        compress(models.conv_net(), _plan({"kind": "svd", "rank": 2}))


def test_broken_model_bytes_are_refused():
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        compress(b"\x08\x07garbage" * 10, _plan({"kind": "prune"}))


def test_missing_model_file_is_refused(tmp_path):
    with pytest.raises(InvalidModelError, match="does not exist"):
        compress(tmp_path / "nope.onnx", _plan({"kind": "prune"}))


def test_wrong_calibration_data_names_expected_inputs():
    with pytest.raises(DataError, match="missing \\['x'\\].*x: float32"):
        compress(models.mlp(), _plan({"kind": "quantize", "mode": "static"}), calibration={"input": np.ones((4, 64))})


def test_unstructured_prune_report_matches_the_model(tmp_path):
    source = models.mlp()
    path = tmp_path / "in.onnx"
    onnx.save(source, path)
    result = compress(path, _plan({"kind": "prune", "method": "unstructured", "sparsity": 0.5}))
    assert isinstance(result, CompressionResult)
    report, out = result.report, result.model
    params, zeros = _params(out)
    assert report.after.parameters == params and report.before.parameters == _params(source)[0]
    assert report.after.zero_fraction == pytest.approx(zeros / params)
    assert report.after.gzip_bytes < report.before.gzip_bytes
    assert report.before.size_bytes == len(source.SerializeToString())
    step = report.steps[0]
    assert step.kind == "prune" and step.layers and step.seconds > 0
    for layer in step.layers:
        assert layer.sparsity == pytest.approx(0.5, abs=0.01)
    assert any("faster" in w for w in report.warnings)
    assert report.data.source == "synthetic" and report.data.samples == 16
    assert report.latency_before.runs == report.latency_after.runs >= 5 and report.latency_after.p50_ms > 0
    assert report.latency is not None and report.latency.pairs == report.latency_before.runs
    assert report.latency.ratio_low <= report.latency.ratio <= report.latency.ratio_high
    (agreement,) = report.agreement.outputs
    assert agreement.name == "logits" and 0.5 < agreement.cosine < 1.0 and agreement.top1_agreement is not None
    run(out, {"x": np.ones((2, 64), np.float32)})


def test_report_json_round_trips_with_infinite_snr():
    result = compress(models.mlp(), _plan({"kind": "prune", "sparsity": 0.0}))
    assert result.report.agreement.outputs[0].snr_db == float("inf")
    text = result.report.model_dump_json()
    json.loads(text)  # strict JSON: "Infinity" is a string
    assert Report.model_validate_json(text) == result.report


def test_evaluation_labels_give_accuracy_of_both_models():
    model = models.mlp()
    x = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)
    labels = np.argmax(run(model, {"x": x})[0], axis=1)
    result = compress(model, _plan({"kind": "prune", "sparsity": 0.3}), evaluation={"x": x, "labels": labels})
    acc = result.report.agreement.accuracy
    assert acc is not None and acc.before == 1.0 and acc.samples == 40
    assert acc.drop_points == pytest.approx((acc.before - acc.after) * 100)
    assert result.report.data.source == "evaluation"


def test_calibration_data_is_used_for_agreement_when_no_evaluation_data():
    x = np.random.default_rng(1).standard_normal((12, 64)).astype(np.float32)
    result = compress(models.mlp(), _plan({"kind": "quantize", "mode": "static"}), calibration={"x": x})
    assert result.report.data.source == "calibration" and result.report.data.samples == 12


def test_chained_plan_prune_svd_quantize():
    rng = np.random.default_rng(2)
    calibration = {"x": rng.standard_normal((32, 64)).astype(np.float32)}
    plan = _plan(
        {"kind": "prune", "method": "structured", "sparsity": 0.25},
        {"kind": "svd", "rank_ratio": 0.5, "min_elements": 0},
        {"kind": "quantize", "mode": "static", "per_channel": True},
    )
    result = compress(models.mlp(), plan, calibration=calibration)
    kinds = [s.kind for s in result.report.steps]
    assert kinds == ["prune", "svd", "quantize"]
    assert result.report.after.size_bytes < result.report.before.size_bytes
    # svd at half rank on random (flat-spectrum) weights is lossy; measured 0.55 with these seeds.
    assert result.report.agreement.outputs[0].cosine > 0.4
    assert "QuantizeLinear" in result.report.after.op_counts


def test_symbolic_dimension_needs_shape_and_then_works():
    with pytest.raises(PlanError, match="input_shapes"):
        compress(models.lstm(), _plan({"kind": "prune"}))
    result = compress(models.lstm(), _plan({"kind": "prune", "min_elements": 0}, input_shapes={"x": [5, 1, 16]}))
    assert result.report.data.input_shapes == {"x": [5, 1, 16]}
    assert {layer.op_type for layer in result.report.steps[0].layers} >= {"LSTM"}


def test_constant_node_weights_and_old_opset_are_handled():
    result = compress(models.conv_net(opset=11), _plan({"kind": "prune", "sparsity": 0.5, "min_elements": 0}))
    pruned = {layer.weight for layer in result.report.steps[0].layers}
    assert {"conv0.W", "conv1.W", "fc.W"} <= pruned


def test_save_is_atomic_and_loadable(tmp_path):
    result = compress(models.mlp(), _plan({"kind": "prune"}))
    target = tmp_path / "out.onnx"
    result.save(target)
    assert list(tmp_path.iterdir()) == [target]
    onnx.checker.check_model(onnx.load(target), full_check=True)


def test_library_does_not_import_the_server():
    code = (
        "import sys, onnx_ops; assert not any(m.split('.')[0] in {'fastapi', 'huey', 'uvicorn'} for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api_is_sorted_and_complete():
    import onnx_ops

    assert onnx_ops.__all__ == sorted(onnx_ops.__all__)
    assert all(hasattr(onnx_ops, name) for name in onnx_ops.__all__)


def _decaying_spectrum_mlp(k: int = 256, n: int = 256, classes: int = 10) -> onnx.ModelProto:
    """A MatMul whose weight has singular values 0.9**i, as trained layers often have, then a head."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    u, _ = np.linalg.qr(rng.standard_normal((k, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = (u[:, : min(k, n)] * 0.9 ** np.arange(min(k, n))) @ v[:, : min(k, n)].T
    head = rng.standard_normal((n, classes)) * 0.2
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="big"), helper.make_node("MatMul", ["h", "head"], ["y"])],
        "decaying",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(head.astype(np.float32), "head")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_svd_energy_099_keeps_cosine_and_saves_parameters():
    result = compress(_decaying_spectrum_mlp(), _plan({"kind": "svd", "energy": 0.99}))
    report = result.report
    (layer,) = report.steps[0].layers
    assert layer.weight == "W" and layer.rank < 60 and layer.params_after < layer.params_before / 2
    assert report.after.parameters < report.before.parameters * 0.6
    assert report.agreement.outputs[0].cosine > 0.99


def test_quantizing_a_quantized_model_is_refused():
    once = compress(models.mlp(), _plan({"kind": "quantize", "mode": "dynamic"})).model
    with pytest.raises(PlanError, match="already quantized"):
        compress(once, _plan({"kind": "quantize", "mode": "dynamic"}))
