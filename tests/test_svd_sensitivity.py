"""param_ratio's allocation weighs each layer by how much the model's outputs move per unit of its output error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.capture import Layer, capture
from onnx_ops.passes import _svd_sensitivity
from onnx_ops.passes._base import PassContext
from onnx_ops.passes._svd_aware import aware_layer, whiten
from onnx_ops.passes._svd_graph import Candidate
from onnx_ops.passes.svd import SvdFactorizePass
from onnx_ops.plan import SvdStep
from tests.helpers import run
from tests.lowrank_helpers import correlated_feeds, lifted

K, N = 64, 48
SCALES = (1.0, 0.05)  # the second branch reaches the output scaled down: its errors matter 400x less


def _branches(seed: int = 0) -> onnx.ModelProto:
    """o = (x W0 + b0) * 1.0 + (x W1 + b1) * 0.05: two MatMul + Add layers of the same input and size."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for i, scale in enumerate(SCALES):
        inits += [numpy_helper.from_array((rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), f"b{i}"),
                  numpy_helper.from_array(np.array(scale, np.float32), f"s{i}")]  # fmt: skip
        nodes += [helper.make_node("MatMul", ["x", f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"], name=f"add{i}"),
                  helper.make_node("Mul", [f"y{i}", f"s{i}"], [f"z{i}"], name=f"mul{i}")]  # fmt: skip
    nodes.append(helper.make_node("Add", ["z0", "z1"], ["o"], name="sum"))
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", K])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", N])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(seed: int) -> list[dict[str, np.ndarray]]:
    return correlated_feeds(K, seed, 4, 96, 8.0, 0.5)


def test_sensitivity_is_the_squared_scale_to_the_output() -> None:
    """In a linear graph a layer's error reaches the output times its scale: the measured ratio is exact."""
    proto, feeds = _branches(), _feeds(1)
    model = lifted(proto)
    nodes = {node.name: node for node in model.graph}
    targets = [aware_layer(Candidate(nodes[f"mm{i}"], nodes[f"mm{i}"].inputs[1])) for i in range(2)]  # type: ignore[arg-type]
    assert all(not isinstance(t, str) for t in targets)
    layers = [Layer(name=f"mm{i}", input="x", output=f"y{i}", k=K, n=N) for i in range(2)]
    stats, _ = capture(proto, None, layers, feeds)
    problems = [whiten(stats[f"mm{i}"], targets[i].candidate.matrix(), True, 0.0, folds=False) for i in range(2)]  # type: ignore[union-attr]
    before = [numpy_helper.to_array(t).copy() for t in ir.to_proto(model).graph.initializer]

    ranks = [_svd_sensitivity.probe_rank(K, N, 0.5)] * 2
    found = _svd_sensitivity.sensitivities(model, targets, problems, ranks, feeds)  # type: ignore[arg-type]

    assert found is not None
    energy = sum(float(np.sum(run(proto, f)[0].astype(np.float64) ** 2)) for f in feeds)
    for scale, s in zip(SCALES, found, strict=True):
        assert s == pytest.approx(scale**2 / energy, rel=1e-3)
    after = [numpy_helper.to_array(t) for t in ir.to_proto(model).graph.initializer]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))  # the probes restored the weights


def _output_error(proto: onnx.ModelProto, use_sensitivity: bool, monkeypatch: pytest.MonkeyPatch) -> float:
    if not use_sensitivity:
        monkeypatch.setattr(_svd_sensitivity, "measured_ranks", lambda *args: None)
    model = lifted(proto)
    step = SvdStep(activation_aware=True, param_ratio=0.5, min_elements=0)
    svd = SvdFactorizePass(step, PassContext(workdir=Path("."), calibration=_feeds(1), teacher=proto))
    svd(model)
    monkeypatch.undo()
    assert svd.log.summary["allocation"] == ("measured sensitivity" if use_sensitivity else "output energy")
    student, held_out = ir.to_proto(model), _feeds(2)
    pairs = [(run(student, f)[0].astype(np.float64), run(proto, f)[0].astype(np.float64)) for f in held_out]
    return sum(float(np.sum((s - t) ** 2)) for s, t in pairs) / sum(float(np.sum(t**2)) for _, t in pairs)


def test_measured_allocation_lowers_the_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the same parameter budget, ranks weighted by measured sensitivity beat ranks by each layer's energy."""
    proto = _branches()
    by_energy = _output_error(proto, False, monkeypatch)
    measured = _output_error(proto, True, monkeypatch)
    assert measured < 0.5 * by_energy
