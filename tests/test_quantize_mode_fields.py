"""A quantize field its mode ignores is refused when set, never run without a word; defaults never count."""

from __future__ import annotations

import json
from typing import Any

import pytest

from onnx_ops.errors import PlanError
from onnx_ops.pipeline import parse_plan
from onnx_ops.plan import Plan, QuantizeStep
from onnx_ops.plan_quantize import IGNORED_IN
from service.form_schema import step_forms

STATIC_ONLY = [
    ("format", "qoperator"),  # accepted in dynamic mode (QOperator-style anyway): see below
    ("activation_type", "int8"),
    ("calibration_method", "entropy"),
    ("fold_affine", False),
    ("recovery", "off"),
    ("rounding", "nearest"),
    ("bias_correction", False),
    ("max_float_layers", 0.1),
    ("output_cosine", 0.99),
    ("recovery_target", "float_outputs"),
]
DYNAMIC_ONLY = [("smoothing", "all"), ("dynamic_rounding", "gptq")]


def _refusal(step: dict[str, Any]) -> str:
    with pytest.raises(PlanError) as caught:
        parse_plan({"steps": [{"kind": "quantize", **step}]})
    return caught.value.message


@pytest.mark.parametrize(("field", "value"), STATIC_ONLY)
@pytest.mark.parametrize("mode", [{"mode": "dynamic"}, {}], ids=["dynamic", "mode-left-out"])
def test_a_static_only_field_is_refused_in_dynamic_mode(mode: dict[str, str], field: str, value: object) -> None:
    if field == "format":
        assert parse_plan({"steps": [{"kind": "quantize", **mode, field: value}]}).steps[0].mode == "dynamic"
        return
    message = _refusal({**mode, field: value})
    assert message == (
        f"invalid plan: step 1 (quantize): {field} applies to static quantization only; remove it or set mode to static"
    )
    parse_plan({"steps": [{"kind": "quantize", "mode": "static", field: value}]})  # where it applies


@pytest.mark.parametrize(("field", "value"), DYNAMIC_ONLY)
def test_a_dynamic_only_field_is_refused_in_static_mode(field: str, value: object) -> None:
    message = _refusal({"mode": "static", field: value})
    assert message.endswith(f"{field} applies to dynamic quantization only; remove it or set mode to dynamic")
    parse_plan({"steps": [{"kind": "quantize", "mode": "dynamic", field: value}]})


def test_every_ignored_field_is_named_and_a_default_written_out_is_no_change() -> None:
    message = _refusal({"mode": "dynamic", "recovery": "off", "rounding": "nearest", "smoothing": "all"})
    assert message.endswith("recovery, rounding apply to static quantization only; remove them or set mode to static")
    # defaults written out change nothing: a full dump that an earlier version stored for a queued job still runs
    full = QuantizeStep.model_construct().__dict__ | {"mode": "dynamic", "kind": "quantize"}
    assert parse_plan({"steps": [full]}).steps[0] == QuantizeStep()


@pytest.mark.parametrize("step", [QuantizeStep(), QuantizeStep(mode="static"), QuantizeStep(smoothing="all")])
def test_a_dumped_step_validates_again(step: QuantizeStep) -> None:
    """The service stores the parsed plan's dump and the job process parses that again: it must not refuse it."""
    dumped = Plan(steps=[step]).model_dump(mode="json")
    assert Plan.model_validate(dumped).steps[0] == step
    assert parse_plan(json.dumps(dumped)).steps[0] == step
    ignored = {name for name, _ in (STATIC_ONLY if step.mode == "dynamic" else DYNAMIC_ONLY)}
    assert not ignored & set(dumped["steps"][0])


def test_the_form_shows_each_refused_field_only_in_the_mode_that_reads_it() -> None:
    """The form leaves hidden fields out of the plan it sends, so it never sends a field the mode refuses."""
    assert [field for field, _ in STATIC_ONLY] == list(IGNORED_IN["dynamic"])
    assert [field for field, _ in DYNAMIC_ONLY] == list(IGNORED_IN["static"])
    widgets = {w.name: w for w in next(f for f in step_forms() if f.kind == "quantize").widgets}
    for field, _ in STATIC_ONLY:
        assert widgets[field].only == ("mode", "static"), field
    for field, _ in DYNAMIC_ONLY:
        assert widgets[field].only == ("mode", "dynamic"), field
