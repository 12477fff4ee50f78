"""The automatic search's candidates in the other formats: k-means, int4, fp16 and graph simplification."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from onnx_ops import compress
from onnx_ops.errors import PlanError
from onnx_ops.pipeline import parse_plan

import models

FAST = {"latency_runs": 3, "latency_seconds": 0.0, "warmup_runs": 1}


def _auto(**fields: Any) -> dict[str, Any]:
    return {"steps": [{"kind": "auto", "time_budget_s": 300, **fields}], "evaluation": FAST}


def test_smallest_tries_kmeans_and_int4_and_keeps_the_smallest_within_budget() -> None:
    model = models.mlp((64, 256, 256, 16))
    data = {"x": np.random.default_rng(0).standard_normal((8, 4, 64), np.float32)}
    plan = _auto(goal="smallest", allow_slower=True, min_cosine=0.95, families=["cluster", "int4", "fp16"])
    result = compress(model, plan, evaluation=data)
    auto = result.report.auto
    assert auto is not None and auto.status == "met"
    by_label = {c.label: c for c in auto.candidates}
    # 4 bits met the budget, so the search went down to 3; int4 met it, so it tried larger blocks too.
    assert list(by_label) == ["k-means 4 bits", "k-means 3 bits", "int4 rtn, blocks of 32", "int4 rtn, blocks of 128"]
    assert by_label["k-means 4 bits"].meets_budget and by_label["int4 rtn, blocks of 32"].meets_budget
    within = [c for c in auto.candidates if c.meets_budget]
    chosen = auto.candidates[auto.chosen or 0]
    assert chosen.size_ratio == min(c.size_ratio or 1 for c in within)
    assert [s.kind for s in result.report.steps] == [chosen.steps[-1]["kind"]]  # the chosen plan was run again
    assert result.report.after.size_bytes < 0.2 * result.report.before.size_bytes


def test_fastest_leaves_out_the_formats_that_are_not_faster_and_simplifies_the_graph() -> None:
    model = models.conv_net(constant_weights=False)  # two BatchNormalization nodes that fold into the Convs
    data = {"image": np.random.default_rng(1).standard_normal((4, 2, 3, 16, 16), np.float32)}
    families = ["optimize", "cluster", "int4", "fp16"]
    auto = compress(model, _auto(goal="fastest", families=families), evaluation=data).report.auto
    assert auto is not None
    assert [c.label for c in auto.candidates] == ["graph simplification"]
    assert auto.candidates[0].steps == [{"kind": "optimize", "level": "basic"}]


def test_int4_is_not_tried_on_a_cnn_where_it_would_store_almost_nothing() -> None:
    model = models.conv_net(constant_weights=False)  # Conv weights; its one Gemm has 320 values
    data = {"image": np.random.default_rng(1).standard_normal((4, 2, 3, 16, 16), np.float32)}
    plan = _auto(goal="smallest", allow_slower=True, min_cosine=0.9, families=["int4", "cluster"])
    auto = compress(model, plan, evaluation=data).report.auto
    assert auto is not None and auto.candidates
    assert all(c.label.startswith("k-means") for c in auto.candidates), [c.label for c in auto.candidates]


def test_auto_families_name_the_new_formats() -> None:
    assert parse_plan(_auto(families=["cluster"])).steps[0].families == ["cluster"]  # type: ignore[union-attr]
    with pytest.raises(PlanError, match="families must name at least one of quantize, prune, svd, optimize, cluster"):
        parse_plan(_auto(families=[]))
