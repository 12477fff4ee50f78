"""distill on factorized students, downstream layers and residual targets (onnx_ops/passes/_refit_targets.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_ops.passes._base import PassContext, PassLog
from onnx_ops.passes._refit_targets import select, teacher_tensors
from onnx_ops.passes.distill import DistillPass
from onnx_ops.passes.svd import SvdFactorizePass
from onnx_ops.plan import DistillStep, SvdStep
from tests.models import residual_mlp


def _feeds(count: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(32, 32)) * np.linspace(1.5, 0.05, 32)[:, None]  # correlated inputs
    return [{"x": (rng.normal(size=(64, 32)) @ mix).astype(np.float32)} for _ in range(count)]


def _prune_input_layer(student: ir.Model, sparsity: float) -> None:
    """Zero the smallest `sparsity` of the first layer's weight only."""
    weight = student.graph.initializers["W_in"]
    assert weight.const_value is not None
    pruned = weight.const_value.numpy().copy()
    pruned[np.abs(pruned) < np.quantile(np.abs(pruned), sparsity)] = 0
    weight.const_value = ir.tensor(pruned, name="W_in")


def _distill(student: ir.Model, teacher: onnx.ModelProto, step: DistillStep, folder: str) -> DistillPass:
    distill = DistillPass(step, PassContext(Path(folder), _feeds(), teacher=teacher))
    distill(student)
    return distill


def test_distill_refits_the_second_svd_factor_to_the_original_layer_output() -> None:
    teacher = residual_mlp()
    student = ir.from_proto(teacher)
    with tempfile.TemporaryDirectory() as folder:
        SvdFactorizePass(SvdStep(rank=8, exclude_nodes=["fc_in", "fc_out"]), PassContext(Path(folder)))(student)
        before = {v.name: v.const_value.numpy().copy() for v in student.graph.initializers.values() if v.const_value}
        distill = _distill(student, teacher, DistillStep(block_steps=0), folder)
    summary = distill.log.summary
    assert summary["layers_selected"] == ["factor: 2"]  # the first factors have no teacher tensor
    assert summary["layers_refit"] >= 1
    assert summary["model_rel_error_after"] < summary["model_rel_error_before"]
    changed = [n for n, v in student.graph.initializers.items() if v.const_value and n in before
               and not np.array_equal(v.const_value.numpy(), before[n])]  # fmt: skip
    assert changed and all(n not in {"W_in", "W_a", "W_b", "W_out"} for n in changed)


def test_downstream_layers_and_residual_targets_are_selected_after_a_pruned_layer() -> None:
    teacher = residual_mlp()
    student = ir.from_proto(teacher)
    _prune_input_layer(student, 0.5)
    found = select(student.graph, teacher_tensors(teacher), DistillStep(downstream=True, residual=True), PassLog())
    assert [t.name for t in found.layers] == ["fc_in", "fc_a", "fc_b", "fc_out"]
    assert found.kinds == {"fc_in": "pruned", "fc_a": "downstream", "fc_b": "downstream", "fc_out": "downstream"}
    assert found.residuals == {"fc_b": "h"}  # fit to the teacher's stream minus the student's h
    assert found.layers[2].layer.output == "s"
    plain = select(student.graph, teacher_tensors(teacher), DistillStep(), PassLog())
    assert [t.name for t in plain.layers] == ["fc_in"] and not plain.residuals


def test_downstream_refit_lowers_the_output_error_more_than_the_pruned_layer_alone() -> None:
    teacher = residual_mlp()
    errors = []
    for downstream in (False, True):
        student = ir.from_proto(teacher)
        _prune_input_layer(student, 0.8)
        with tempfile.TemporaryDirectory() as folder:
            step = DistillStep(downstream=downstream, residual=downstream, block_steps=0)
            errors.append(_distill(student, teacher, step, folder).log.summary["model_rel_error_after"])
    assert errors[1] < errors[0]
