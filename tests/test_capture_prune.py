"""Activation-aware pruning masks: |W| times the captured input norm (Wanda), per output row, in real ORT runs."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
from onnx import numpy_helper

from onnx_ops.errors import PlanError
from onnx_ops.pipeline import compress
from onnx_ops.plan import PruneStep
from onnx_ops.report import Report
from tests import models
from tests.test_distill import _depthwise_net, _images


def _scaled(n: int, seed: int) -> np.ndarray:
    """MLP inputs whose feature scales span 300x, like the outlier features of real activations."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.01, 3.0, 64)[np.random.default_rng(7).permutation(64)]
    return (rng.standard_normal((n, 1, 64)) * scales).astype(np.float32)


def _gap(report: Report, output: str) -> float:
    return next(1.0 - o.cosine for o in report.agreement.outputs if o.name == output)


def _prune(model: object, step: dict[str, object], cal: object, ev: object) -> tuple[dict[str, np.ndarray], Report]:
    result = compress(model, {"steps": [{"kind": "prune", "min_elements": 0, **step}]}, calibration=cal, evaluation=ev)
    return {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}, result.report


def test_activation_mask_keeps_the_weights_of_large_inputs_and_halves_each_output_row() -> None:
    cal, ev = {"x": _scaled(256, 1)}, {"x": _scaled(128, 2)}
    _, magnitude = _prune(models.mlp(), {"sparsity": 0.5}, cal, ev)
    weights, activation = _prune(models.mlp(), {"sparsity": 0.5, "criterion": "activation"}, cal, ev)
    assert _gap(magnitude, "logits") > 1.5 * _gap(activation, "logits")  # measured 2.25x
    w0 = weights["W0"]  # [64 inputs, 128 outputs]: every output keeps exactly 32 of its 64 inputs
    assert ((w0 == 0).sum(axis=0) == 32).all()
    scales = np.geomspace(0.01, 3.0, 64)[np.random.default_rng(7).permutation(64)]
    assert (w0[scales > 1.0] != 0).mean() > 0.9 > 0.1 > (w0[scales < 0.03] != 0).mean()
    assert activation.steps[0].summary["criterion"] == "activation"


def test_activation_mask_on_convs_per_output_channel_and_n_m() -> None:
    cal, ev = {"image": _images(32, 1)}, {"image": _images(32, 2)}
    model = _depthwise_net()
    _, magnitude = _prune(model, {"sparsity": 0.5}, cal, ev)
    weights, activation = _prune(model, {"sparsity": 0.5, "criterion": "activation", "positions": 64}, cal, ev)
    assert _gap(magnitude, "out") > 2 * _gap(activation, "out")  # measured 3.4x
    assert ((weights["w0"] == 0).reshape(16, -1).sum(axis=1) == 14).all()  # round(0.5 * 27) of each filter
    assert ((weights["w1"] == 0).reshape(16, -1).sum(axis=1) == 4).all()  # depthwise: round(0.5 * 9)
    nm, _ = _prune(model, {"method": "n:m", "n": 2, "m": 4, "criterion": "activation"}, cal, ev)
    groups = np.moveaxis(nm["w2"], 1, -1).reshape(-1, 4)  # groups of 4 input channels
    assert ((groups != 0).sum(axis=1) == 2).all()


def test_activation_mask_needs_calibration_and_a_per_row_method() -> None:
    step = {"kind": "prune", "criterion": "activation"}
    with pytest.raises(PlanError, match="activation-aware pruning needs calibration data") as caught:
        compress(models.mlp(), {"steps": [step]})
    assert "mode 'dynamic'" not in str(caught.value)
    with pytest.raises(pydantic.ValidationError, match="structured ranks by norm"):
        PruneStep(method="structured", criterion="activation")
    with pytest.raises(pydantic.ValidationError, match="use scope per_tensor"):
        PruneStep(scope="global", criterion="activation")
