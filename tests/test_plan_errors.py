"""Plan mistakes are named in the plan's words, with the field, kind or value that was probably meant."""

from __future__ import annotations

import pytest

from onnx_ops.errors import PlanError
from onnx_ops.pipeline import parse_plan


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (
            {"steps": [{"kind": "quantize", "mod": "static"}]},
            "unknown field 'mod' in step 1 (quantize); did you mean 'mode'?",
        ),
        ({"steps": [{"kind": "prune"}, {"kind": "quantise"}]}, "step 2: unknown kind 'quantise'; did you mean"),
        ({"step": [{"kind": "prune"}]}, "unknown field 'step' of the plan; did you mean 'steps'?"),
        (
            {"steps": [{"kind": "prune"}], "evaluation": {"latency_run": 3}},
            "unknown field 'latency_run' in evaluation; did you mean 'latency_runs'?",
        ),
        (
            {"steps": [{"kind": "quantize", "mode": "dynamc"}]},
            "field 'mode' in step 1 (quantize): should be 'dynamic' or 'static', got 'dynamc' (text); "
            "did you mean 'dynamic'?",
        ),
        (
            {"steps": [{"kind": "quantize", "embedding_bits": "8"}]},
            "field 'embedding_bits' in step 1 (quantize): should be 8 or 4, got '8' (text)",
        ),
        ({"steps": [{"kind": "svd", "rank": 2, "energy": 0.9}]}, "step 1 (svd): give only one of rank, rank_ratio"),
        (
            {"steps": [{}]},
            "step 1: a step needs a 'kind' (optimize, prune, svd, distill, quantize, int4, fp16, cluster, auto)",
        ),
        ({}, "the plan needs the field 'steps'"),
        ([], "the plan must be a JSON object with a 'steps' list"),
        ('{"steps": [', "the plan is not valid JSON"),
    ],
)
def test_plan_mistakes_are_named_with_a_close_match(plan, message):
    with pytest.raises(PlanError) as caught:
        parse_plan(plan)
    assert caught.value.message.startswith("invalid plan: ")
    assert message in caught.value.message


def test_a_word_far_from_every_field_gets_no_suggestion():
    with pytest.raises(PlanError) as caught:
        parse_plan({"steps": [{"kind": "prune", "zzz": 1}]})
    assert caught.value.message == "invalid plan: unknown field 'zzz' in step 1 (prune)"
