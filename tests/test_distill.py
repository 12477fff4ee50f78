"""The distill step: pruned MatMul/Gemm layers refit to the original model, measured on held-out inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.errors import PlanError
from onnx_ops.pipeline import compress
from onnx_ops.report import Report
from tests import models
from tests.recovery_helpers import correlated, gap, minilm, with_and_without_distill


def _images(n: int, seed: int) -> np.ndarray:
    """Images whose neighbouring pixels correlate (noise blurred by a 3x3 box), one per feed."""
    x = np.random.default_rng(seed).standard_normal((n, 1, 3, 16, 16))
    for axis in (3, 4):
        x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    return x.astype(np.float32)


def _depthwise_net(seed: int = 0) -> onnx.ModelProto:
    """Conv 3x3 -> ReLU -> depthwise Conv 3x3 stride 2 with bias -> ReLU -> pointwise Conv -> global pool."""
    rng = np.random.default_rng(seed)
    weights = {
        "w0": rng.standard_normal((16, 3, 3, 3)) * 0.3,
        "w1": rng.standard_normal((16, 1, 3, 3)) * 0.3,
        "b1": rng.standard_normal(16) * 0.1,
        "w2": rng.standard_normal((32, 16, 1, 1)) * 0.3,
    }
    nodes = [
        helper.make_node("Conv", ["image", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="dw", group=16, pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="pw"),
        helper.make_node("GlobalAveragePool", ["c2"], ["out"], name="pool"),
    ]
    graph = helper.make_graph(
        nodes,
        "depthwise",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 32, 1, 1])],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _prune_then_distill(
    model: onnx.ModelProto, prune: dict[str, object], distill: dict[str, object], cal: object, ev: object
) -> tuple[onnx.ModelProto, Report, onnx.ModelProto, Report]:
    return with_and_without_distill(model, prune, cal, ev, distill)  # type: ignore[arg-type]


def _assert_same_zeros(pruned: onnx.ModelProto, recovered: onnx.ModelProto, names: list[str]) -> None:
    before, after = _weights(pruned), _weights(recovered)
    for name in names:
        np.testing.assert_array_equal(before[name] == 0, after[name] == 0, err_msg=name)
        assert not np.array_equal(before[name], after[name]), f"{name} was not refit"


@pytest.mark.parametrize("gemm", [False, True])
def test_distill_recovers_pruned_mlp_on_held_out_inputs(gemm: bool) -> None:
    model = models.mlp(gemm=gemm)
    prune = {"kind": "prune", "sparsity": 0.5, "min_elements": 0}
    pruned, plain, recovered, report = _prune_then_distill(
        model, prune, {"min_elements": 0}, {"x": correlated(512, 1)[:, None]}, {"x": correlated(128, 2)[:, None]}
    )
    assert gap(plain, "logits") > 5 * gap(report, "logits")
    _assert_same_zeros(pruned, recovered, ["W0", "W1", "W2"])
    assert report.after.zero_fraction == pytest.approx(plain.after.zero_fraction)
    step = report.steps[1]
    assert step.kind == "distill" and step.summary["layers_refit"] == 3 and step.summary["levels"] == 3
    before, after = step.summary["model_rel_error_before"], step.summary["model_rel_error_after"]
    assert isinstance(before, float) and isinstance(after, float) and after < before / 5
    assert all(layer.note and "->" in layer.note for layer in step.layers)


def test_distill_keeps_n_m_pattern_and_one_shot_mode_helps_too() -> None:
    model = models.mlp()
    prune = {"kind": "prune", "method": "n:m", "n": 2, "m": 4, "min_elements": 0}
    cal, ev = {"x": correlated(512, 3)[:, None]}, {"x": correlated(128, 4)[:, None]}
    pruned, plain, recovered, report = _prune_then_distill(model, prune, {"min_elements": 0}, cal, ev)
    _assert_same_zeros(pruned, recovered, ["W0", "W1", "W2"])
    groups = _weights(recovered)["W1"].reshape(32, 4, 128)  # [k/m, m, n]: at most n of each group non-zero
    assert int((groups != 0).sum(axis=1).max()) <= 2
    assert gap(plain, "logits") > 5 * gap(report, "logits")
    one_shot = _prune_then_distill(model, prune, {"min_elements": 0, "sequential": False}, cal, ev)[3]
    assert one_shot.steps[1].summary["levels"] == 1
    # One pass on the pruned model's inputs helps less: its downstream layers are fit to inputs that change.
    assert gap(report, "logits") < gap(one_shot, "logits") < gap(plain, "logits")


def test_distill_recovers_pruned_conv_net_on_held_out_images() -> None:
    """Conv-BN-ReLU x2 then Gemm (Constant-node weights): the Convs are refit from sampled im2col patches."""
    prune = {"kind": "prune", "sparsity": 0.5, "min_elements": 0}
    cal, ev = {"image": _images(64, 1)}, {"image": _images(32, 2)}
    pruned, plain, recovered, report = _prune_then_distill(models.conv_net(), prune, {"min_elements": 0}, cal, ev)
    assert gap(plain, "logits") > 10 * gap(report, "logits")  # measured 29x
    step = report.steps[1]
    assert [layer.name for layer in step.layers] == ["conv0", "conv1", "fc"] and step.summary["levels"] == 3
    _assert_same_zeros(pruned, recovered, ["conv0.W", "conv1.W", "fc.W"])


def test_distill_refits_depthwise_conv_per_channel_with_its_bias() -> None:
    prune = {"kind": "prune", "sparsity": 0.5, "min_elements": 0}
    cal, ev = {"image": _images(64, 3)}, {"image": _images(32, 4)}
    model = _depthwise_net()
    pruned, plain, recovered, report = _prune_then_distill(model, prune, {"min_elements": 0, "positions": 64}, cal, ev)
    assert gap(plain, "out") > 3 * gap(report, "out")  # measured 6.7x with all 256 positions
    _assert_same_zeros(pruned, recovered, ["w0", "w1", "w2"])
    assert not np.array_equal(_weights(pruned)["b1"], _weights(recovered)["b1"])
    layers = report.steps[1].layers
    assert [layer.name for layer in layers] == ["conv0", "dw", "pw"]
    # 64 of conv0's 256 output positions sampled per feed, 64 feeds.
    assert layers[0].note and "(level 1, 4096 rows)" in layers[0].note


def test_distill_leaves_unpruned_layers_alone() -> None:
    model = models.mlp()
    prune = {"kind": "prune", "sparsity": 0.5, "min_elements": 0, "only_nodes": ["fc1"]}
    pruned, _, recovered, report = _prune_then_distill(
        model, prune, {"min_elements": 0}, {"x": correlated(256, 5)[:, None]}, {"x": correlated(64, 6)[:, None]}
    )
    before, after = _weights(pruned), _weights(recovered)
    for name in ("W0", "W2", "b0", "b2"):
        np.testing.assert_array_equal(before[name], after[name])
    assert [layer.name for layer in report.steps[1].layers] == ["fc1"]


def test_distill_refuses_a_plan_without_calibration_data_or_prune() -> None:
    with pytest.raises(PlanError, match="distill needs calibration data"):
        compress(models.mlp(), {"steps": [{"kind": "prune"}, {"kind": "distill"}]})
    with pytest.raises(PlanError, match="distill needs a prune or svd step before it"):
        compress(models.mlp(), {"steps": [{"kind": "distill"}]}, calibration={"x": correlated(8, 0)[:, None]})


def test_distill_restores_digits_accuracy() -> None:
    from tests.digits import digits

    d = digits()
    name = d.model.graph.input[0].name
    cal = {name: d.x_train[:, None, :]}
    ev = {name: d.x_test[:, None, :], "labels": d.y_test}
    prune = {"kind": "prune", "sparsity": 0.5, "min_elements": 0}
    pruned, plain, recovered, report = _prune_then_distill(d.model, prune, {"min_elements": 0}, cal, ev)
    _assert_same_zeros(pruned, recovered, ["coefficient", "coefficient1", "coefficient2"])
    assert gap(plain, "probabilities") > 5 * gap(report, "probabilities")
    assert report.agreement.accuracy is not None
    assert report.agreement.accuracy.drop_points <= 2.0


@pytest.mark.realmodel
@pytest.mark.slow
def test_distill_recovers_pruned_minilm_on_held_out_sentences() -> None:
    model, cal, ev = minilm(calibration=64)
    prune = {"kind": "prune", "sparsity": 0.5}
    pruned, plain, recovered, report = _prune_then_distill(model, prune, {}, cal, ev)
    floats = [o.name for o in plain.agreement.outputs if 1.0 - o.cosine > 1e-6]  # the int64 pass-throughs match
    assert floats
    for name in floats:  # 64 calibration feeds of 2 x 16 tokens: 2048 rows for up to 1537 unknowns a column
        assert gap(plain, name) > 2 * gap(report, name), name
    assert report.steps[1].summary["layers_refit"] == 18
    before, after = _weights(pruned), _weights(recovered)
    refit = [n for n, w in before.items() if w.ndim == 2 and not np.array_equal(w, after[n])]
    assert len(refit) == 18
    for name in refit:
        np.testing.assert_array_equal(before[name] == 0, after[name] == 0, err_msg=name)
