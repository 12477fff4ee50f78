"""Per-layer sparsity allocation of unstructured activation-aware pruning: owl and measured, same overall fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pydantic
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.passes import _prune_allocation
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.prune import MagnitudePrunePass
from onnx_ops.pipeline import compress
from onnx_ops.plan import PruneStep


def _two_branches(seed: int = 0) -> onnx.ModelProto:
    """y = x @ A + (x @ P) @ B: B's input has rank 8 (P is left dense), A's is full rank.

    Half of B's 64 inputs still span its 8-dimensional input, so a refit of B's kept weights recovers its
    output exactly at any sparsity up to 87%; A's error grows with every weight it loses.
    """
    rng = np.random.default_rng(seed)
    low = (rng.standard_normal((64, 8)) @ rng.standard_normal((8, 64)) / 8).astype(np.float32)
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), name) for name in ("A", "B")
    ] + [numpy_helper.from_array(low, "P")]
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["a"], name="fa"),
        helper.make_node("MatMul", ["x", "P"], ["p"], name="proj"),
        helper.make_node("MatMul", ["p", "B"], ["b"], name="fb"),
        helper.make_node("Add", ["a", "b"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(seed: int, outliers: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    scale = np.ones(64, np.float32)
    if outliers:
        scale[:4] = 20.0  # a few input features far larger than the rest, as in transformer activations
    return [{"x": (rng.standard_normal((64, 64)) * scale).astype(np.float32)} for _ in range(4)]


def _prune(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], **step: object) -> MagnitudePrunePass:
    model = ir.from_proto(proto)
    prune = MagnitudePrunePass(
        PruneStep(criterion="activation", **step), PassContext(workdir=Path("."), calibration=feeds)
    )
    prune.precheck(model)
    prune(model)
    return prune


def _sparsities(prune: MagnitudePrunePass) -> dict[str, float]:
    return {layer.name: layer.sparsity for layer in prune.log.layers}


def test_greedy_spends_the_budget_where_the_error_grows_slowest() -> None:
    grid = np.linspace(0.35, 0.65, 7)
    steep, flat = (grid - 0.35) * 10, (grid - 0.35) * 0.1
    chosen = _prune_allocation.greedy([100, 300], [steep, flat], grid, 0.5)
    assert chosen[0] == pytest.approx(0.35)  # the steep layer stays at the lower bound
    assert chosen[1] == pytest.approx(0.55)  # the flat one takes the rest: (0.5 * 400 - 0.35 * 100) / 300
    assert np.dot([100, 300], chosen) / 400 == pytest.approx(0.5)


def test_whole_rows_prunes_exactly_the_overall_fraction_when_the_rows_allow() -> None:
    step = PruneStep(criterion="activation", allocation="measured", sparsity=0.5)
    layouts = [(8, 64), (128, 64), (128, 128)]  # (rows, weights per row); 8 divides what is left
    chosen = _prune_allocation.whole_rows(layouts, [0.6, 0.55, 0.5], step)
    pruned = [s * k for s, (_, k) in zip(chosen, layouts, strict=True)]
    assert all(p == round(p) for p in pruned)  # a whole number per row
    total = sum(p * r for p, (r, _) in zip(pruned, layouts, strict=True))
    assert total == 0.5 * sum(r * k for r, k in layouts)


def test_balance_keeps_the_size_weighted_mean_within_the_bounds() -> None:
    step = PruneStep(criterion="activation", allocation="owl", sparsity=0.5, allocation_range=0.15)
    chosen = _prune_allocation.balance([10, 1000, 30], np.array([0.2, 0.55, 0.9]), step)
    assert all(0.35 - 1e-12 <= s <= 0.65 + 1e-12 for s in chosen)
    assert np.dot([10, 1000, 30], chosen) / 1040 == pytest.approx(0.5)


def test_measured_allocation_prunes_the_recoverable_layer_more_at_the_same_total() -> None:
    proto = _two_branches()
    uniform = _prune(proto, _feeds(1), min_elements=0, exclude_nodes=["proj"])
    measured = _prune(proto, _feeds(1), min_elements=0, exclude_nodes=["proj"], allocation="measured")
    assert _sparsities(uniform) == {"fa": 0.5, "fb": 0.5}
    chosen = _sparsities(measured)
    assert chosen["fb"] == pytest.approx(0.65, abs=0.01)  # the upper bound: a refit recovers it
    assert chosen["fa"] == pytest.approx(0.35, abs=0.01)
    assert measured.log.summary["achieved_sparsity"] == 0.5
    assert measured.log.summary["allocation"] == "measured"


def test_owl_gives_the_layer_with_outlier_inputs_the_lowest_sparsity_at_the_same_total() -> None:
    step = {
        "kind": "prune",
        "criterion": "activation",
        "allocation": "owl",
        "min_elements": 0,
        "exclude_nodes": ["proj"],
    }
    cal, ev = _feeds(2, outliers=True), _feeds(3, outliers=True)
    result = compress(_two_branches(), {"steps": [step]}, calibration=_stacked(cal), evaluation=_stacked(ev))
    prune = result.report.steps[0]  # through the pipeline: the report takes the per-layer summary
    ratios = {k: float(v) for k, v in (entry.split(": ") for entry in prune.summary["outlier_ratio"])}
    chosen = {layer.name: layer.sparsity for layer in prune.layers}
    assert ratios["fa"] > ratios["fb"]  # fa sees the raw outlier features; fb sees them mixed by P
    assert chosen["fa"] == pytest.approx(0.35, abs=0.01)
    assert chosen["fb"] == pytest.approx(0.65, abs=0.01)
    assert prune.summary["layer_sparsity"] == [f"{name}: {s:.4f}" for name, s in chosen.items()]  # 22 and 42 of 64
    assert prune.summary["achieved_sparsity"] == 0.5


def _stacked(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {"x": np.concatenate([f["x"] for f in feeds])}


@pytest.mark.parametrize("step", [{"allocation": "owl"}, {"allocation": "measured", "method": "n:m"}])
def test_allocation_needs_unstructured_activation_pruning(step: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError, match="allocation owl or measured"):
        PruneStep(**step)  # type: ignore[arg-type]
