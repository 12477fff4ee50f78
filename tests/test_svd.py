"""SvdFactorizePass: structure, numerics against ONNX Runtime, rank rules, skips and the precheck."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnx_ops.errors import PlanError
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.svd import SvdFactorizePass
from onnx_ops.plan import SvdStep
from tests import models
from tests.helpers import assert_outputs_close, random_feeds, run


def _svd(proto: onnx.ModelProto, **step: object) -> tuple[onnx.ModelProto, SvdFactorizePass, bool]:
    """Lift constants as the pipeline does, factorize, and check the result with the full checker."""
    model = ir.from_proto(proto)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    svd = SvdFactorizePass(SvdStep(**step), PassContext(workdir=Path(".")))
    result = svd(model)
    assert result.model is model
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, svd, result.modified


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in proto.graph.initializer}


def _matmul(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w.astype(np.float32), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(
    "rule", [{"rank_ratio": 0.125}, {"rank": 8}, {"energy": 0.999}, {"rank": 8, "algorithm": "randomized"}]
)
def test_svd_is_exact_for_low_rank_weight(rule: dict[str, object]) -> None:
    proto = models.low_rank_linear(k=64, n=64, rank=8)
    out, svd, modified = _svd(proto, **rule)
    assert modified
    assert _ops(out) == ["MatMul", "MatMul"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert _shapes(out) == {"W_svd_a": [64, 8], "W_svd_b": [8, 64]}  # the original W is gone
    assert_outputs_close(out, proto, atol=1e-4)
    (change,) = svd.log.layers
    assert (change.name, change.op_type, change.weight, change.rank) == ("mm", "MatMul", "W", 8)
    assert change.shape_before == [64, 64] and change.shape_after == [64, 8, 8, 64]
    assert (change.params_before, change.params_after) == (4096, 1024)
    assert change.rel_error is not None and change.rel_error < 1e-5
    assert svd.log.summary["params_saved"] == 3072 and svd.log.summary["matrices_factorized"] == 1


def test_runs_without_threadpoolctl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # optional: then one thread, BLAS's own threads
    proto = models.low_rank_linear(k=64, n=64, rank=8)
    out, _, modified = _svd(proto, rank=8)
    assert modified
    assert_outputs_close(out, proto, atol=1e-4)


def test_factors_share_the_singular_values_evenly() -> None:
    out, _, _ = _svd(models.low_rank_linear(k=64, n=64, rank=8), rank=8)
    arrays = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    a, b = arrays["W_svd_a"], arrays["W_svd_b"]
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-4)


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "alpha", "beta", "bias"),
    [(0, 0, 1.0, 1.0, "row"), (1, 1, 0.5, 2.0, "full"), (1, 0, 2.0, 0.0, "row"), (0, 1, 1.5, -1.0, "scalar"),
     (0, 1, 1.0, 1.0, "none")],
)  # fmt: skip
def test_gemm_attributes_are_folded(trans_a: int, trans_b: int, alpha: float, beta: float, bias: str) -> None:
    proto = models.gemm(k=64, n=48, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, bias=bias, spectrum=8)
    out, svd, modified = _svd(proto, rank=8, min_elements=1024)
    assert modified
    expected = ["Transpose"] * trans_a + ["MatMul", "MatMul"] + ["Add"] * (bias != "none" and beta != 0.0)
    assert _ops(out) == expected
    assert [o.name for o in out.graph.output] == ["y"]
    assert _shapes(out)["B_svd_a"] == [64, 8] and _shapes(out)["B_svd_b"] == [8, 48]
    assert "B" not in _shapes(out)
    assert_outputs_close(out, proto, atol=1e-4)
    assert svd.log.layers[0].op_type == "Gemm" and svd.log.layers[0].shape_before == [64, 48]


def test_gemm_with_a_bias_input_is_scaled_by_beta() -> None:
    proto = models.gemm(k=64, n=64, alpha=2.0, beta=0.5, trans_b=1, spectrum=8)
    graph = proto.graph  # turn the constant C into a graph input: beta must then be applied by a Mul node
    graph.input.append(helper.make_tensor_value_info("C", TensorProto.FLOAT, [64]))
    del graph.initializer[[t.name for t in graph.initializer].index("C")]
    out, _, modified = _svd(proto, rank=8)
    assert modified and _ops(out) == ["MatMul", "MatMul", "Mul", "Add"]
    assert_outputs_close(out, proto, atol=1e-4)


def test_weight_on_the_left() -> None:
    proto = models.left_matmul(m=48, k=64, spectrum=8)
    out, svd, modified = _svd(proto, rank=8, min_elements=1024)
    assert modified and _ops(out) == ["MatMul", "MatMul"]
    assert out.graph.node[0].input[0] == "W_svd_b" and out.graph.node[1].input[0] == "W_svd_a"
    assert _shapes(out) == {"W_svd_a": [48, 8], "W_svd_b": [8, 64]}
    assert_outputs_close(out, proto, atol=1e-4)
    assert svd.log.layers[0].shape_after == [48, 8, 8, 64]


def test_batched_3d_activations() -> None:
    proto = models.transformer_ffn(hidden=64, ffn=256, spectrum=8)
    out, svd, modified = _svd(proto, rank=8)
    assert modified and _ops(out) == ["MatMul", "MatMul", "Add", "Relu", "MatMul", "MatMul", "Add"]
    feeds = random_feeds(proto, dims={"batch": 2, "seq": 5})
    assert_outputs_close(out, proto, atol=1e-4, feeds=feeds)
    assert [c.shape_after for c in svd.log.layers] == [[64, 8, 8, 256], [256, 8, 8, 64]]


def test_energy_keeps_the_output_of_a_decaying_spectrum() -> None:
    proto = _matmul(models._matrix(np.random.default_rng(0), 128, 256, "decay"))
    out, svd, modified = _svd(proto, energy=0.99)
    feeds = random_feeds(proto, batch=32)
    assert modified
    assert _cosine(run(out, feeds)[0], run(proto, feeds)[0]) > 0.99
    assert svd.log.summary["params_saved"] > 0
    for change in svd.log.layers:
        assert change.params_after < change.params_before
        assert change.rel_error is not None and change.rel_error <= 0.1 + 1e-6  # sqrt(1 - 0.99)
        assert change.note is not None and change.note.startswith("energy kept 0.99")


def test_default_rule_is_energy_099() -> None:
    _, svd, _ = _svd(models.transformer_ffn(hidden=64, ffn=256, spectrum="decay"))
    assert all(c.rel_error is not None and c.rel_error <= 0.1 + 1e-6 for c in svd.log.layers)


def test_no_saving_is_skipped_with_reason() -> None:
    proto = models.linear(k=64, n=32)  # flat spectrum: energy 0.99 needs nearly full rank
    out, svd, modified = _svd(proto, min_elements=1024)
    assert not modified
    assert _ops(out) == ["MatMul", "Add"] and _shapes(out)["W"] == [64, 32]
    (skip,) = svd.log.skipped
    assert skip.name == "mm" and "saves nothing for 64x32" in skip.reason
    assert svd.log.summary["matrices_factorized"] == 0


def test_fixed_rank_that_saves_nothing_is_skipped() -> None:
    _, svd, modified = _svd(models.linear(k=64, n=32), rank=30, min_elements=1024)
    assert not modified
    assert svd.log.skipped[0].reason == "rank 30 saves nothing for 64x32"


def test_max_rel_error_skips_the_matrix() -> None:
    _, svd, modified = _svd(models.linear(k=64, n=64), rank_ratio=0.25, max_rel_error=0.1)
    assert not modified
    assert "exceeds max_rel_error 0.1" in svd.log.skipped[0].reason


def test_small_weights_excluded_nodes_and_recurrent_nodes_are_skipped() -> None:
    _, svd, _ = _svd(models.mlp(sizes=(64, 128, 128, 10)), rank=8, exclude_nodes=["fc1"], min_elements=2048)
    reasons = {s.name: s.reason for s in svd.log.skipped}
    assert reasons["fc1"] == "excluded by exclude_nodes"
    assert "1280 elements < min_elements 2048" in reasons["fc2"]
    assert [c.name for c in svd.log.layers] == ["fc0"]
    _, svd, modified = _svd(models.lstm(), min_elements=1)
    assert not modified
    assert svd.log.skipped[0].name == "lstm" and "recurrent" in svd.log.skipped[0].reason


def test_shared_weight_is_factorized_once() -> None:
    proto = models.shared_weight(k=64, spectrum=8)
    out, svd, _ = _svd(proto, rank=8)
    assert _ops(out) == ["MatMul"] * 4
    assert _shapes(out) == {"W_svd_a": [64, 8], "W_svd_b": [8, 64]}
    (change,) = svd.log.layers
    assert change.note is not None and "shared by 2 nodes" in change.note
    assert_outputs_close(out, proto, atol=1e-4)


def test_precheck_refuses_a_model_without_matmul_weights() -> None:
    model = ir.from_proto(models.conv_net())
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    svd = SvdFactorizePass(SvdStep(), PassContext(workdir=Path(".")))
    expected = r"svd: no MatMul or Gemm with a constant 2-D weight of at least 4096 elements \(found: Conv x2; fc: "
    with pytest.raises(PlanError, match=expected):
        svd.precheck(model)
    SvdFactorizePass(SvdStep(min_elements=100), PassContext(workdir=Path("."))).precheck(model)  # Gemm fc: 320


def test_randomized_is_close_to_exact_on_low_rank_plus_noise() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 16)) @ rng.standard_normal((16, 192)) / 16 + 1e-3 * rng.standard_normal((256, 192))
    proto = _matmul(w)
    exact, exact_svd, _ = _svd(proto, rank=16, algorithm="exact")
    fast, fast_svd, _ = _svd(proto, rank=16, algorithm="randomized")
    exact_error, fast_error = exact_svd.log.layers[0].rel_error, fast_svd.log.layers[0].rel_error
    assert exact_error is not None and fast_error is not None
    assert fast_error <= exact_error * 1.01
    assert "randomized" in (fast_svd.log.layers[0].note or "")
    feeds = random_feeds(proto)
    np.testing.assert_allclose(run(fast, feeds)[0], run(exact, feeds)[0], atol=1e-3)


@pytest.mark.parametrize("algorithm", ["auto", "randomized", "exact"])
def test_energy_rule_agrees_across_algorithms(algorithm: str) -> None:
    rng = np.random.default_rng(2)
    u, v = np.linalg.qr(rng.standard_normal((512, 512)))[0], np.linalg.qr(rng.standard_normal((600, 512)))[0]
    w = (u * 0.9 ** np.arange(512)) @ v.T  # energy 0.99 needs rank 22
    _, svd, _ = _svd(_matmul(w), energy=0.99, algorithm=algorithm)
    (change,) = svd.log.layers
    assert change.rank == 22
    expected = {"auto": "gram", "exact": "exact", "randomized": "randomized"}[algorithm]
    assert change.note is not None and f"({expected})" in change.note


def test_auto_skips_a_large_flat_matrix() -> None:
    w = np.random.default_rng(3).standard_normal((512, 512))
    _, svd, modified = _svd(_matmul(w), energy=0.99)
    assert not modified and "saves nothing for 512x512" in svd.log.skipped[0].reason
