"""auto's goals judged on robust timing: ties within noise are ties, and balanced (the default) takes the smaller.

The model is a Conv net whose run time is all in its Conv layers, plus a small Gemm head: quantizing the head
(dynamic mode leaves Conv in float) and storing the Conv weights as int8 (ONNX Runtime folds them back to float
at load) change the size a lot and the run time not at all. So the default goal must return a smaller model,
and `fastest`, which needs a measured speed-up, must keep the original. No latency figure is asserted.

The timer is scripted to say so (every candidate times like the original; ONNX Runtime still builds and runs
each): on a loaded host a real timing's verdict is a draw (a "faster" or "slower" by chance), and these tests are
about what each goal does with the verdicts.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops import compress
from onnx_ops.plan import AutoStep

from helpers import NO_LATENCY, script_search_timing


def _conv_net(seed: int = 0) -> onnx.ModelProto:
    """image[N, 3, 48, 48] -> Conv 3->32 -> Relu -> Conv 32->64 -> Relu -> GlobalAveragePool -> Gemm 64->10."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((0.3 * rng.standard_normal((32, 3, 3, 3))).astype(np.float32), "c1.W"),
        numpy_helper.from_array((0.1 * rng.standard_normal((64, 32, 3, 3))).astype(np.float32), "c2.W"),
        numpy_helper.from_array((0.2 * rng.standard_normal((10, 64))).astype(np.float32), "fc.W"),
        numpy_helper.from_array((0.1 * rng.standard_normal(10)).astype(np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "c1.W"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.W"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.W", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_heavy",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 48, 48])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _evaluation() -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(1).standard_normal((4, 2, 3, 48, 48)).astype(np.float32)}


def _auto(**fields: object) -> dict[str, object]:
    step = {"kind": "auto", "families": ["quantize"], "time_budget_s": 3600, **fields}  # a budget for a hang
    return {"steps": [step], "evaluation": NO_LATENCY}


@pytest.fixture
def steady_timer(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every timing of the search reports no measurable change."""
    return script_search_timing(monkeypatch)


def test_balanced_is_the_default_goal():
    assert AutoStep().goal == "balanced" and AutoStep().allow_slower is False


def test_default_goal_returns_a_smaller_model_that_is_not_slower(steady_timer):
    model = _conv_net()
    result = compress(model, _auto(min_cosine=0.99), evaluation=_evaluation())
    auto = result.report.auto
    assert auto is not None and auto.goal.startswith("balanced"), auto
    assert auto.status == "met" and auto.chosen is not None, auto.message
    chosen = auto.candidates[auto.chosen]
    assert chosen.latency_verdict != "slower" and chosen.latency_low is not None
    assert chosen.latency_low <= chosen.latency_ratio <= (chosen.latency_high or 0)
    # Int8 storage of the Conv weights is the smallest candidate within budget; its compute is float as before.
    assert chosen.size_ratio is not None and chosen.size_ratio < 0.5
    assert "int8 storage" in chosen.label
    assert result.report.after.size_bytes < 0.5 * result.report.before.size_bytes
    measured = [
        c for c in auto.candidates if c.status == "measured" and c.meets_budget and c.latency_verdict != "slower"
    ]
    # The smallest, or one within 2% of its size that timed faster (sizes that close count as equal).
    assert chosen.size_ratio <= 1.02 * min(c.size_ratio or 1 for c in measured)
    assert "interval" in auto.message


def test_fastest_needs_a_measured_speed_up_and_keeps_the_original_otherwise(steady_timer):
    # No candidate can be measurably faster: the Conv layers, all of the run time, stay float in every one.
    model = _conv_net()
    result = compress(model, _auto(goal="fastest"), evaluation=_evaluation())
    auto = result.report.auto
    assert auto is not None and auto.status == "original" and auto.plan is None, auto.message
    assert "measurably faster" in auto.message
    measured = [c for c in auto.candidates if c.status == "measured"]
    assert len(measured) >= 2 and all(c.latency_verdict == "no measurable change" for c in measured)
    assert len(steady_timer) >= len(measured)
