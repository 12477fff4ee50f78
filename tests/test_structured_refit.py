"""Structured pruning with recovery: the distill step refits shrunk layers; channels chosen by activations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops import capture
from onnx_ops.passes import _structured_refit
from onnx_ops.pipeline import compress
from onnx_ops.report import Report
from tests import models
from tests.helpers import assert_outputs_close, run
from tests.recovery_helpers import NO_LATENCY, correlated, gap, minilm, with_and_without_distill


def _images(n: int, seed: int, channels: int = 3, size: int = 16) -> np.ndarray:
    """Smooth random images (noise upsampled 4x): neighbouring pixels and channels are correlated."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((n, 1, channels, size // 4, size // 4)) + 0.5 * rng.standard_normal((n, 1, 1, 1, 1))
    return np.kron(coarse, np.ones((1, 1, 1, 4, 4))).astype(np.float32) + 0.05 * rng.standard_normal(
        (n, 1, channels, size, size)
    ).astype(np.float32)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def _plain_and_recovered(
    model: onnx.ModelProto, prune: dict[str, object], cal: dict[str, np.ndarray], ev: dict[str, np.ndarray]
) -> tuple[onnx.ModelProto, Report, onnx.ModelProto, Report]:
    return with_and_without_distill(model, prune, cal, ev, {"min_elements": 0}, calibrate_prune=True)


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul_add", "gemm"])
def test_distill_refits_structured_mlp_on_held_out_inputs(gemm: bool) -> None:
    prune = {"kind": "prune", "method": "structured", "sparsity": 0.3, "min_elements": 0}
    cal, ev = {"x": correlated(512, 1, 64)[:, None]}, {"x": correlated(128, 2, 64)[:, None]}
    plain, plain_report, recovered, report = _plain_and_recovered(models.mlp(gemm=gemm), prune, cal, ev)
    assert _shapes(recovered) == _shapes(plain)  # same structure: only the values were refit
    assert gap(plain_report, "logits") > 5 * gap(report, "logits")  # 8.3x (MatMul), measured
    summary = report.steps[1].summary
    assert summary["structured_layers_refit"] == 3  # both hidden layers (inputs shrunk) and the head
    assert summary["structured_rel_error_after"] < summary["structured_rel_error_before"] / 5
    assert plain_report.steps[0].summary["selection"] == "activation"


def test_distill_refits_structured_conv_net_and_adds_a_bias() -> None:
    model = models.conv_net(opset=13, constant_weights=False)
    prune = {"kind": "prune", "method": "structured", "sparsity": 0.25, "min_elements": 0, "channel_multiple": 1}
    cal, ev = {"image": _images(64, 1)}, {"image": _images(32, 2)}
    plain, plain_report, recovered, report = _plain_and_recovered(model, prune, cal, ev)
    assert _shapes(recovered)["conv1.W"] == _shapes(plain)["conv1.W"] == (24, 12, 3, 3)
    assert "conv1.W_structured_bias" in _shapes(recovered)  # Conv without a bias got one
    assert gap(plain_report, "logits") > 5 * gap(report, "logits")
    assert report.steps[1].summary["structured_layers_refit"] >= 2


def _se_block(seed: int = 0) -> onnx.ModelProto:
    """Pointwise Conv -> Relu -> depthwise Conv -> Relu -> squeeze-and-excitation gate (Mul) -> pointwise Conv."""
    rng = np.random.default_rng(seed)
    c, r, out = 16, 4, 8

    def init(name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "Wa", "Ba"], ["a"], name="pw_a"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "Wd", "Bd"], ["d"], name="dw", group=c, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["rd"], name="relu_d"),
        helper.make_node("GlobalAveragePool", ["rd"], ["p"], name="gap"),
        helper.make_node("Conv", ["p", "Wr", "Br"], ["s1"], name="se_reduce"),
        helper.make_node("Relu", ["s1"], ["s2"], name="se_relu"),
        helper.make_node("Conv", ["s2", "We"], ["s3"], name="se_expand"),
        helper.make_node("Add", ["s3", "Be"], ["s4"], name="se_bias"),
        helper.make_node("HardSigmoid", ["s4"], ["g"], name="se_gate"),
        helper.make_node("Mul", ["rd", "g"], ["m"], name="se_mul"),
        helper.make_node("Conv", ["m", "Wp"], ["y"], name="pw_p"),
    ]
    kernel = 0.3 * rng.standard_normal((1, 1, 3, 3)) + 0.05 * rng.standard_normal((c, 1, 3, 3))
    inits = [
        init("Wa", (c, 3, 1, 1)),
        init("Ba", (c,), 0.1),
        numpy_helper.from_array(kernel.astype(np.float32), "Wd"),  # similar kernels: channels stay correlated
        init("Bd", (c,), 0.1),
        init("Wr", (r, c, 1, 1)),
        init("Br", (r,), 0.1),
        init("We", (c, r, 1, 1)),
        init("Be", (1, c, 1, 1), 0.1),
        init("Wp", (out, c, 1, 1)),
    ]
    graph = helper.make_graph(
        nodes,
        "se_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_structured_prunes_through_depthwise_conv_and_se_gate_exactly_when_channels_are_dead() -> None:
    proto = _se_block()
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    dead = [1, 4, 9, 14]
    arrays["Wa"][dead] = 0
    arrays["Ba"][dead] = 0
    arrays["Bd"][dead] = 0  # Relu(dw(0) + 0) = 0: the gate multiplies zero, the SE pool reads zero
    for tensor in proto.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(arrays[tensor.name], tensor.name))
    step = {"kind": "prune", "method": "structured", "sparsity": 0.25, "min_elements": 0, "only_nodes": ["pw_a"]}
    step["channel_multiple"] = 1  # 16 channels: the default would keep all of them
    result = compress(proto, {"steps": [step]})
    shapes = _shapes(result.model)
    assert shapes["Wa"] == (12, 3, 1, 1) and shapes["Wd"] == (12, 1, 3, 3) and shapes["Bd"] == (12,)
    assert shapes["Wr"] == (4, 12, 1, 1) and shapes["We"] == (12, 4, 1, 1) and shapes["Be"] == (1, 12, 1, 1)
    assert shapes["Wp"] == (8, 12, 1, 1)
    groups = {n.name: a.i for n in result.model.graph.node for a in n.attribute if a.name == "group"}
    assert groups["dw"] == 12
    feeds = {"x": np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    assert assert_outputs_close(result.model, proto, atol=1e-5, feeds=feeds) < 1e-5


def test_structured_refit_recovers_se_block_on_held_out_images() -> None:
    prune = {"kind": "prune", "method": "structured", "sparsity": 0.25, "min_elements": 0, "channel_multiple": 1}
    cal, ev = {"x": _images(48, 1, size=8)}, {"x": _images(24, 2, size=8)}
    _, plain_report, recovered, report = _plain_and_recovered(_se_block(), prune, cal, ev)
    assert gap(plain_report, "y") > 6 * gap(report, "y")  # 13x measured
    feeds = {"x": _images(2, 5, size=8)[:, 0]}
    assert run(recovered, feeds)[0].shape == (2, 8, 8, 8)


def test_activation_aware_selection_removes_channels_the_data_never_excites() -> None:
    """Hidden units with the largest weights that calibration inputs never turn on are removed first."""
    from onnx_ops.passes._base import PassContext
    from onnx_ops.passes.prune import MagnitudePrunePass
    from onnx_ops.plan import PruneStep

    proto = models.mlp(sizes=(64, 32, 32, 10))
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    silent = [0, 5, 11, 20]
    arrays["W0"][:, silent] *= 10  # largest weights: magnitude keeps them
    arrays["b0"][silent] = -1e4  # Relu never lets them through on any input
    for tensor in proto.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(arrays[tensor.name], tensor.name))
    feeds = [{"x": correlated(64, 1, 64)}]
    kept = {}
    for label, calibration in (("activation", feeds), ("magnitude", None)):
        model = ir.from_proto(proto)
        step = PruneStep(method="structured", sparsity=0.125, min_elements=0, only_nodes=["fc0"])
        prune = MagnitudePrunePass(step, PassContext(workdir=Path("."), calibration=calibration))
        prune(model)
        assert prune.log.summary["selection"] == label
        value = model.graph.initializers["b0"].const_value
        assert value is not None
        kept[label] = value.numpy()
    assert not np.isin(-1e4, kept["activation"]).any()  # the four silent units went
    assert np.count_nonzero(kept["magnitude"] == -1e4) == 4  # magnitude kept them all


@pytest.mark.parametrize("bias", [True, False])
def test_ridge_path_solves_the_normal_equations_with_an_undamped_bias(bias: bool) -> None:
    from onnx_ops.capture import LayerStats
    from onnx_ops.passes._structured_ridge import RidgePath

    rng = np.random.default_rng(0)
    x, y = correlated(200, 3, 12, latent=5) + 0.3, rng.standard_normal((200, 4))
    stats = LayerStats.empty(12, 4)
    stats.add(x, y)
    prior = rng.standard_normal((13, 4))
    lam = 0.05 * float(np.mean(np.sum(x.astype(np.float64) ** 2, axis=0)))
    # Direct: minimise ||X W + 1 b - Y||^2 + lam ||W - W_prior||^2 (b free, or fixed at the prior's).
    x1 = np.hstack([x, np.ones((200, 1))]).astype(np.float64)
    ridge = np.diag([lam] * 12 + [0.0])
    if bias:
        want = np.linalg.solve(x1.T @ x1 + ridge, x1.T @ y + ridge @ prior)
    else:
        w = np.linalg.solve(
            x1[:, :12].T @ x1[:, :12] + lam * np.eye(12), x1[:, :12].T @ (y - prior[12]) + lam * prior[:12]
        )
        want = np.vstack([w, prior[12:]])
    np.testing.assert_allclose(RidgePath(stats, prior, bias).solve(0.05), want, rtol=1e-6, atol=1e-8)


@pytest.mark.realmodel
@pytest.mark.slow
def test_structured_minilm_ffn_recovered_on_held_out_sentences() -> None:
    from tests import real_models

    model, cal, ev = minilm(calibration=48)
    prune = {"kind": "prune", "method": "structured", "sparsity": 0.3}
    plain, plain_report, recovered, report = _plain_and_recovered(model, prune, cal, ev)
    assert sum(1076 in shape for shape in _shapes(plain).values()) == 9  # 3 FFNs: up weight and bias, down weight
    assert _shapes(recovered) == _shapes(plain)
    floats = [o.name for o in plain_report.agreement.outputs if 1.0 - o.cosine > 1e-6]
    assert floats
    for name in floats:
        assert gap(plain_report, name) > 2 * gap(report, name), name
    # of the 6 shrunk layers (3 FFN pairs), those whose cross-validated error the refit lowers (4 here)
    assert report.steps[1].summary["structured_layers_refit"] >= 3
    assert run(recovered, real_models.sample_feeds("minilm_l3", 1, seed=3)[0])[0].shape[0] == 2


def _conv_pair(channels: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2"),
        ],
        "conv_pair",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [
            numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "W1"),
            numpy_helper.from_array(rng.standard_normal((8, channels, 1, 1)).astype(np.float32), "W2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("multiple", "kept"), [(16, 48), (1, 52)])
def test_conv_keeps_a_multiple_of_16_channels_by_default(multiple: int, kept: int) -> None:
    step = {"kind": "prune", "method": "structured", "sparsity": 0.2, "min_elements": 0, "channel_multiple": multiple}
    result = compress(_conv_pair(64), {"steps": [step]})
    assert _shapes(result.model)["W1"] == (kept, 3, 3, 3) and _shapes(result.model)["W2"] == (8, kept, 1, 1)


def test_conv_of_16_channels_is_left_whole_by_default() -> None:
    from onnx_ops.errors import PlanError

    with pytest.raises(PlanError, match="sparsity 0.25 of 16 channels removes none"):
        compress(_conv_pair(16), {"steps": [{"kind": "prune", "method": "structured", "sparsity": 0.25}]})


def test_structured_refit_captures_the_ir_model_without_a_proto_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each level's capture and the final output error take the IR model (a large one goes through a file
    ONNX Runtime maps, not a proto copy); the refit model is the same either way sessions are built."""
    prune = {"kind": "prune", "method": "structured", "sparsity": 0.3, "min_elements": 0}
    plan = {"steps": [prune, {"kind": "distill", "min_elements": 0}], "evaluation": NO_LATENCY}
    cal, ev = {"x": correlated(256, 1, 64)[:, None]}, {"x": correlated(32, 2, 64)[:, None]}
    students: list[object] = []

    def spy(function: Callable[..., object]) -> Callable[..., object]:
        def wrapped(teacher: object, student: object, *args: object, **kwargs: object) -> object:
            students.append(student)
            return function(teacher, student, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(_structured_refit, "capture", spy(_structured_refit.capture))
    monkeypatch.setattr(_structured_refit, "output_error", spy(_structured_refit.output_error))
    in_memory = compress(models.mlp(), plan, calibration=cal, evaluation=ev)
    assert in_memory.report.steps[1].summary["structured_layers_refit"] >= 2
    assert students and all(isinstance(s, ir.Model) for s in students)
    monkeypatch.setattr(capture, "FILE_BYTES", 0)  # every session through a file, as for a large model
    through_files = compress(models.mlp(), plan, calibration=cal, evaluation=ev)
    weights = {t.name: numpy_helper.to_array(t) for t in in_memory.model.graph.initializer}
    assert sorted(weights) == sorted(t.name for t in through_files.model.graph.initializer)
    for tensor in through_files.model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), weights[tensor.name], err_msg=tensor.name)
