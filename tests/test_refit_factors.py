"""Distill refits both factors of a low-rank pair: reduced-rank regression on the student's inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.capture import LayerStats
from onnx_ops.passes import _refit_targets
from onnx_ops.passes._base import PassContext, PassLog, constant_array
from onnx_ops.passes._layers import linear
from onnx_ops.passes._refit_factors import first_factor, refit_pair, widen
from onnx_ops.passes.distill import DistillPass
from onnx_ops.plan import DistillStep
from tests.helpers import run
from tests.lowrank_helpers import correlated_feeds, lifted

K, N, R = 48, 40, 6


def _graph(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "pair",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", N])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _teacher(seed: int = 0) -> onnx.ModelProto:
    """y = x W + b."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b")]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"])]
    return _graph(nodes, inits)


def _student(seed: int = 1) -> onnx.ModelProto:
    """y = (x A) B + b with random rank-R factors: a poor first factor that refitting B alone cannot mend."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((K, R)).astype(np.float32), "A"),
             numpy_helper.from_array(rng.standard_normal((R, N)).astype(np.float32) * 0.1, "B"),
             numpy_helper.from_array(np.zeros(N, np.float32), "b")]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "A"], ["xa"], name="mm_a"),
             helper.make_node("MatMul", ["xa", "B"], ["h"], name="mm_b"),
             helper.make_node("Add", ["h", "b"], ["y"])]  # fmt: skip
    return _graph(nodes, inits)


def _feeds(seed: int, decay: float = 6.0) -> list[dict[str, np.ndarray]]:
    return correlated_feeds(K, seed, 6, 64, decay, 0.3)


def test_both_factors_are_the_reduced_rank_regression() -> None:
    """Without folds or ridge, A B is the rank-R least-squares map (numpy: lstsq, then the fitted values' SVD)."""
    model = lifted(_student())
    second = next(node for node in model.graph if node.name == "mm_b")
    target = linear(second)
    assert not isinstance(target, str)
    first = first_factor(target)
    assert first is not None and first.name == "mm_a"
    widen(target, first)
    assert (target.layer.input, target.layer.k) == ("x", K)
    teacher = _teacher()
    feeds = _feeds(2, decay=24.0)  # well conditioned: the comparison is to float64 round-off
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    y = np.concatenate([run(teacher, f)[0] for f in feeds]).astype(np.float64)
    y += np.random.default_rng(3).standard_normal(y.shape) * 0.1  # not exactly rank-limited: the rank matters
    stats = LayerStats.empty(K, N)
    stats.add(x, y)

    assert refit_pair(target, first, stats, 0.0, PassLog()) == 1

    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    w_ls = np.linalg.lstsq(xc, yc, rcond=None)[0]
    _, _, vt = np.linalg.svd(xc @ w_ls, full_matrices=False)
    w_r = w_ls @ vt[:R].T @ vt[:R]  # the fitted values projected on their R leading directions
    bias = y.mean(axis=0) - x.mean(axis=0) @ w_r
    a, b = constant_array(first.inputs[1]), target.matrices()[0]  # type: ignore[arg-type]
    np.testing.assert_allclose(a.astype(np.float64) @ b, w_r, atol=1e-5 * np.abs(w_r).max())
    np.testing.assert_allclose(target.bias_rows()[0], bias, atol=1e-5 * np.abs(bias).max())


def _held_out_error(both: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> float:
    teacher, student = _teacher(), lifted(_student())
    if not both:  # the earlier refit: the second factor alone, on x A
        monkeypatch.setattr(_refit_targets, "first_factor", lambda target: None)
    context = PassContext(workdir=tmp_path, calibration=_feeds(2), teacher=teacher)
    distill = DistillPass(DistillStep(min_elements=0), context)
    distill(student)
    monkeypatch.undo()
    assert distill.log.summary["layers_refit"] == 1
    assert ("both factors refit" in distill.log.layers[0].note) == both
    refit = ir.to_proto(student)
    pairs = [(run(refit, f)[0].astype(np.float64), run(teacher, f)[0].astype(np.float64)) for f in _feeds(5)]
    return sum(float(np.sum((s - t) ** 2)) for s, t in pairs) / sum(float(np.sum(t**2)) for _, t in pairs)


def test_refitting_both_factors_beats_the_second_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On held-out inputs, distill's pair refit leaves far less error than B refit given a poor A."""
    second_only = _held_out_error(False, tmp_path, monkeypatch)
    both = _held_out_error(True, tmp_path, monkeypatch)
    assert both < 0.5 * second_only
