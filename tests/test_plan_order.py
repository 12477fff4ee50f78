"""The plan's order rule for distill, in the same words in the library's error and the form's greyed-out button."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnx_ops.errors import PlanError
from onnx_ops.pipeline import parse_plan

FORM_JS = Path(__file__).resolve().parents[1] / "service" / "static" / "form.js"


@pytest.mark.parametrize("before", [[], ["optimize"], ["optimize", "optimize"]], ids=["alone", "optimize", "twice"])
def test_distill_without_a_prune_or_svd_step_before_it_is_refused(before: list[str]) -> None:
    steps = [{"kind": kind} for kind in [*before, "distill"]]
    with pytest.raises(PlanError, match="distill needs a prune or svd step before it"):
        parse_plan({"steps": steps})


@pytest.mark.parametrize("lossy", ["prune", "svd"])
def test_distill_after_a_prune_or_an_svd_step_is_accepted(lossy: str) -> None:
    plan = parse_plan({"steps": [{"kind": "optimize"}, {"kind": lossy}, {"kind": "distill"}]})
    assert [step.kind for step in plan.steps] == ["optimize", lossy, "distill"]


def test_the_form_greys_out_distill_in_the_words_of_the_plan_error() -> None:
    with pytest.raises(PlanError) as refused:
        parse_plan({"steps": [{"kind": "distill"}]})
    reason = str(refused.value).removeprefix("invalid plan: ")
    assert reason.startswith("distill needs a prune or svd step before it")
    assert f'why = "{reason}";' in FORM_JS.read_text(encoding="utf-8")
