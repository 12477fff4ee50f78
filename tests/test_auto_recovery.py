"""The automatic search's recovery candidates: pruning and activation-aware SVD refit on calibration data."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from onnx_ops import compress
from onnx_ops.auto_recovery import SKIPPED_NOTE
from onnx_ops.html_report import render_html

import models

FAST = {"latency_runs": 3, "latency_seconds": 0.0, "warmup_runs": 1}
FAMILIES = ["prune", "svd", "cluster"]


def _plan() -> dict[str, Any]:
    step = {"kind": "auto", "time_budget_s": 600, "goal": "smallest", "allow_slower": True, "min_cosine": 0.9}
    return {"steps": [{**step, "families": FAMILIES}], "evaluation": FAST}


def _data(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((8, 4, 64), np.float32)}


def test_with_calibration_auto_tries_recovered_pruning_and_svd_and_returns_a_model_that_runs() -> None:
    model = models.mlp((64, 256, 256, 16))
    result = compress(model, _plan(), evaluation=_data(0), calibration=_data(1))
    auto = result.report.auto
    assert auto is not None and auto.notes == []
    kinds = {c.label: [s["kind"] for s in c.steps] for c in auto.candidates}
    recovered = {label: k for label, k in kinds.items() if "distill" in k}
    assert any(k[0] == "prune" and k[-1] == "quantize" for k in recovered.values()), kinds  # structured
    assert any(k == ["prune", "distill", "cluster"] for k in recovered.values()), kinds  # unstructured
    svd = [c for c in auto.candidates if c.steps[0].get("activation_aware")]
    assert svd and svd[0].steps[0]["param_ratio"] == 0.5 and svd[0].status == "measured", kinds
    assert all(c.status == "measured" for c in auto.candidates if "distill" in kinds[c.label]), auto.candidates
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": _data(2)["x"][0]})
    assert out.shape == (4, 16) and np.isfinite(out).all()


def test_without_calibration_the_recovery_candidates_are_skipped_and_the_report_says_so() -> None:
    result = compress(models.mlp((64, 256, 256, 16)), _plan(), evaluation=_data(0))
    auto = result.report.auto
    assert auto is not None and auto.notes == [SKIPPED_NOTE]
    assert auto.candidates and not any("distill" in [s["kind"] for s in c.steps] for c in auto.candidates)
    assert not any(c.steps[0].get("activation_aware") for c in auto.candidates)
    assert SKIPPED_NOTE in render_html(result.report)
