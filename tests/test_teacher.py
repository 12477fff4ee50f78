"""Distill's teacher after graph simplification: the model as of the plan's leading lossless steps."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_ops.auto_layers import insert
from onnx_ops.errors import PlanError
from onnx_ops.pipeline import compress, parse_plan
from onnx_ops.plan import DistillStep, OptimizeStep, PruneStep, QuantizeStep
from onnx_ops.teacher import lossless_prefix
from tests import models

FAST = {"latency_runs": 2, "latency_seconds": 0.0, "warmup_runs": 1}
_PRUNE = {"kind": "prune", "sparsity": 0.5, "op_types": ["Conv"]}


def _images(n: int, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, 1, 3, 16, 16))
    for axis in (3, 4):  # neighbouring pixels correlate, as in real images
        x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    return {"image": x.astype(np.float32)}


def test_distill_after_optimize_refits_every_pruned_layer_against_the_simplified_teacher() -> None:
    # BatchNormalization folded into each Conv changes the Conv's weight: a teacher taken before optimize has
    # no such weight, so distill found nothing to refit (and the pruned model stayed as it was).
    source = models.conv_net(constant_weights=False)
    data = {"calibration": _images(24, 0), "evaluation": _images(8, 1)}
    plain = compress(source, {"steps": [_PRUNE, {"kind": "distill"}], "evaluation": FAST}, **data)
    steps = [{"kind": "optimize"}, _PRUNE, {"kind": "distill"}]
    simplified = compress(source, {"steps": steps, "evaluation": FAST}, **data)
    refit = simplified.report.steps[2].summary["layers_refit"]
    assert refit == plain.report.steps[1].summary["layers_refit"] == 2
    summary = simplified.report.steps[2].summary
    assert float(summary["model_rel_error_after"]) < float(summary["model_rel_error_before"]) / 2
    cosine = [o.cosine for o in simplified.report.agreement.outputs]
    assert cosine[0] >= plain.report.agreement.outputs[0].cosine - 1e-3


def test_a_lossless_step_between_a_lossy_one_and_distill_is_refused() -> None:
    with pytest.raises(PlanError, match="optimize must come before prune when the plan distills"):
        parse_plan({"steps": [_PRUNE, {"kind": "optimize"}, {"kind": "distill"}]})
    parse_plan({"steps": [_PRUNE, {"kind": "distill"}, {"kind": "optimize"}, {"kind": "quantize"}]})  # after: fine


def test_lossless_prefix() -> None:
    assert lossless_prefix([OptimizeStep(), PruneStep(), DistillStep(), QuantizeStep()]) == 1
    assert lossless_prefix([PruneStep(), OptimizeStep()]) == 0
    assert lossless_prefix([OptimizeStep()]) == 1


def test_auto_puts_graph_simplification_before_every_lossy_step() -> None:
    plan = [PruneStep(method="structured", sparsity=0.25), DistillStep(), QuantizeStep()]
    assert [s.kind for s in insert(OptimizeStep(), plan)] == ["optimize", "prune", "distill", "quantize"]
    assert [s.kind for s in insert(PruneStep(), [OptimizeStep(), QuantizeStep()])] == ["optimize", "prune", "quantize"]
