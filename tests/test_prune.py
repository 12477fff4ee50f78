"""MagnitudePrunePass: unstructured, N:M and structured pruning, checked for structure and against ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnx_ops.errors import PlanError
from onnx_ops.passes import _masks
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.prune import MagnitudePrunePass
from onnx_ops.plan import PruneStep
from tests import models
from tests.helpers import assert_outputs_close, random_feeds, run


def _prune(proto: onnx.ModelProto, **step: object) -> tuple[onnx.ModelProto, MagnitudePrunePass, bool]:
    """Lift Constant-node weights as the pipeline does, prune, and check the result with the full checker."""
    model = ir.from_proto(proto)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    prune = MagnitudePrunePass(PruneStep(**step), PassContext(workdir=Path(".")))
    prune.precheck(model)
    result = prune(model)
    assert result.model is model
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, prune, result.modified


def _weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}


def _lifted_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    model = ir.from_proto(proto)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    return _weights(ir.to_proto(model))


def _with_weights(proto: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for i, t in enumerate(proto.graph.initializer):
        if t.name in arrays:
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(arrays[t.name].astype(np.float32), t.name))
    return proto


def _only_relu() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _shared_weight_model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W"], ["y"], name="second"),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# --- unstructured -------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_unstructured_per_tensor_zeroes_smallest_weights_within_one_point(sparsity: float) -> None:
    proto = models.mlp()
    out, prune, modified = _prune(proto, sparsity=sparsity, min_elements=0)
    assert modified
    before, after = _weights(proto), _weights(out)
    for name in ("W0", "W1", "W2"):
        zeroed = after[name] == 0
        assert abs(zeroed.mean() - sparsity) <= 0.01
        assert np.abs(before[name][zeroed]).max() <= np.abs(before[name][~zeroed]).min()
        np.testing.assert_array_equal(after[name][~zeroed], before[name][~zeroed])
    for bias in ("b0", "b1", "b2"):  # not a weight slot: biases are never pruned
        np.testing.assert_array_equal(after[bias], before[bias])
    assert {c.weight for c in prune.log.layers} == {"W0", "W1", "W2"}
    assert abs(prune.log.summary["achieved_sparsity"] - sparsity) <= 0.01
    assert any("does not make ONNX Runtime CPU inference faster" in w for w in prune.log.warnings)
    run(out, random_feeds(out))


def test_unstructured_global_uses_one_threshold_over_all_tensors() -> None:
    proto = models.mlp(sizes=(64, 128, 128, 10))
    out, prune, _ = _prune(proto, sparsity=0.6, scope="global", min_elements=0)
    before, after = _weights(proto), _weights(out)
    names = ["W0", "W1", "W2"]
    zeros = sum(int((after[n] == 0).sum()) for n in names)
    total = sum(after[n].size for n in names)
    assert abs(zeros / total - 0.6) <= 0.01
    removed = max(np.abs(before[n][after[n] == 0]).max() for n in names)
    kept = min(np.abs(before[n][after[n] != 0]).min() for n in names)
    assert removed <= kept
    per_tensor = [float((after[n] == 0).mean()) for n in names]
    assert max(per_tensor) - min(per_tensor) > 0.02  # layers with smaller weights lose more
    assert prune.log.summary["scope"] == "global"


def test_unstructured_zeroes_exact_count_when_magnitudes_tie() -> None:
    proto = _with_weights(models.linear(64, 32), {"W": np.ones((64, 32))})
    out, _, _ = _prune(proto, sparsity=0.25, min_elements=0)
    assert int((_weights(out)["W"] == 0).sum()) == 512


def test_unstructured_prunes_lstm_w_and_r() -> None:
    proto = models.lstm()
    out, prune, _ = _prune(proto, sparsity=0.5, op_types=["LSTM"], min_elements=0)
    after = _weights(out)
    assert abs((after["W"] == 0).mean() - 0.5) <= 0.01
    assert abs((after["R"] == 0).mean() - 0.5) <= 0.01
    assert not (after["head"] == 0).any()
    assert [(c.name, c.op_type) for c in prune.log.layers] == [("lstm", "LSTM"), ("lstm", "LSTM")]
    assert run(out, random_feeds(out, dims={"T": 5}))[0].shape == (4, 5)


def test_constant_node_weights_of_conv_net_are_pruned_after_lifting() -> None:
    proto = models.conv_net(opset=11, constant_weights=True)
    out, _, _ = _prune(proto, sparsity=0.5, min_elements=0)
    after = _weights(out)
    for name in ("conv0.W", "conv1.W", "fc.W"):
        assert abs((after[name] == 0).mean() - 0.5) <= 0.01
    assert not [n for n in out.graph.node if n.op_type == "Constant"]
    run(out, random_feeds(out))


def test_shared_weight_is_pruned_once_unstructured() -> None:
    out, prune, _ = _prune(_shared_weight_model(), sparsity=0.5, min_elements=0)
    assert len(prune.log.layers) == 1
    assert prune.log.layers[0].note == "shared by first, second"
    assert (_weights(out)["W"] == 0).mean() == 0.5


def test_exclude_nodes_and_min_elements_are_respected_and_logged() -> None:
    proto = models.mlp(sizes=(64, 128, 128, 10))
    out, prune, _ = _prune(proto, sparsity=0.5, exclude_nodes=["fc1"], min_elements=2000)
    after = _weights(out)
    assert (after["W0"] == 0).mean() == 0.5
    assert not (after["W1"] == 0).any()  # excluded
    assert not (after["W2"] == 0).any()  # 1280 < 2000 elements
    reasons = {s.name: s.reason for s in prune.log.skipped}
    assert reasons["fc1"] == "in exclude_nodes"
    assert "fewer than min_elements=2000" in reasons["fc2"]


def test_nothing_to_do_leaves_model_unmodified() -> None:
    _, _, modified = _prune(models.mlp(), sparsity=0.0, min_elements=0)
    assert not modified
    once, _, _ = _prune(models.mlp(), sparsity=0.5, min_elements=0)
    twice, _, modified_again = _prune(once, sparsity=0.5, min_elements=0)
    assert not modified_again
    assert _weights(once).keys() == _weights(twice).keys()


@pytest.mark.parametrize("method", ["unstructured", "n:m", "structured"])
def test_precheck_refuses_model_without_candidates(method: str) -> None:
    model = ir.from_proto(_only_relu())
    prune = MagnitudePrunePass(PruneStep(method=method), PassContext(workdir=Path(".")))
    with pytest.raises(PlanError, match="finds no"):
        prune.precheck(model)
    assert not prune(model).modified


def test_precheck_refuses_weights_below_min_elements() -> None:
    prune = MagnitudePrunePass(PruneStep(min_elements=10**6), PassContext(workdir=Path(".")))
    with pytest.raises(PlanError, match="at least 1000000 elements"):
        prune.precheck(ir.from_proto(models.mlp()))


# --- n:m ----------------------------------------------------------------------------------------


def _assert_n_of_m(before: np.ndarray, after: np.ndarray, axis: int, n: int, m: int) -> None:
    """Every group of m along axis keeps exactly its n largest entries (by magnitude)."""
    b = np.moveaxis(before, axis, -1).reshape(-1, m)
    a = np.moveaxis(after, axis, -1).reshape(-1, m)
    for group_before, group_after in zip(b, a, strict=True):
        kept = group_after != 0
        assert kept.sum() == n
        assert np.abs(group_before[kept]).min() >= np.abs(group_before[~kept]).max()


@pytest.mark.parametrize(
    ("proto", "weights"),
    [
        (models.mlp(), {"W0": 0, "W1": 0, "W2": 0}),  # MatMul W[K, N]: groups along K
        (models.mlp(gemm=True), {"W0": 1, "W1": 1, "W2": 1}),  # Gemm transB=1: W[N, K]
        (models.conv_net(opset=17, constant_weights=False), {"conv1.W": 1, "fc.W": 1}),  # Conv: along Cin
        (models.lstm(), {"W": 2, "R": 2}),
    ],
    ids=["matmul", "gemm", "conv", "lstm"],
)
def test_nm_keeps_n_largest_in_every_group_along_input_dim(proto: onnx.ModelProto, weights: dict[str, int]) -> None:
    out, prune, _ = _prune(proto, method="n:m", n=2, m=4, min_elements=0)
    before, after = _weights(proto), _weights(out)
    for name, axis in weights.items():
        _assert_n_of_m(before[name], after[name], axis, 2, 4)
    assert prune.log.summary["target_sparsity"] == 0.5
    assert any("N:M sparsity does not make ONNX Runtime" in w for w in prune.log.warnings)
    run(out, random_feeds(out, dims={"T": 3}))


def test_nm_skips_tensor_whose_input_dim_is_not_divisible_by_m() -> None:
    proto = models.conv_net(opset=17, constant_weights=False)
    out, prune, _ = _prune(proto, method="n:m", n=1, m=4, min_elements=0)
    assert {s.name: s.reason for s in prune.log.skipped}["conv0"] == "input dimension 3 is not divisible by m=4"
    assert not (_weights(out)["conv0.W"] == 0).any()
    _assert_n_of_m(_weights(proto)["conv1.W"], _weights(out)["conv1.W"], 1, 1, 4)


# --- structured ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul_add", "gemm"])
def test_structured_mlp_shrinks_hidden_layers_and_consumers(gemm: bool) -> None:
    proto = models.mlp(sizes=(64, 128, 96, 10), gemm=gemm)
    out, prune, modified = _prune(proto, method="structured", sparsity=0.5, min_elements=0)
    assert modified
    shapes = {name: list(a.shape) for name, a in _weights(out).items()}
    if gemm:  # transB=1: W[N, K]
        assert shapes == {"W0": [64, 64], "b0": [64], "W1": [48, 64], "b1": [48], "W2": [10, 48], "b2": [10]}
    else:
        assert shapes == {"W0": [64, 64], "b0": [64], "W1": [64, 48], "b1": [48], "W2": [48, 10], "b2": [10]}
    summary = prune.log.summary
    assert (summary["layers_pruned"], summary["neurons_removed"], summary["neurons_before"]) == (2, 112, 224)
    before = sum(a.size for a in _weights(proto).values())
    assert summary["params_removed"] == before - sum(a.size for a in _weights(out).values())
    assert {s.name: s.reason for s in prune.log.skipped} == {"fc2": "output 'logits' reaches a graph output"}
    changes = {c.weight: c for c in prune.log.layers}
    assert changes["W1"].shape_before == ([96, 128] if gemm else [128, 96])
    assert changes["W1"].params_after == 64 * 48
    assert 0 < changes["W0"].rel_error < 1
    assert not prune.log.warnings
    assert run(out, random_feeds(out))[0].shape == (4, 10)


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul_add", "gemm"])
def test_structured_removes_dead_neurons_without_changing_outputs(gemm: bool) -> None:
    proto = models.mlp(sizes=(32, 64, 64, 10), gemm=gemm)
    arrays = _weights(proto)
    rng = np.random.default_rng(1)
    dead0, dead1 = rng.choice(64, 16, replace=False), rng.choice(64, 16, replace=False)
    for name, bias, dead in (("W0", "b0", dead0), ("W1", "b1", dead1)):
        if gemm:
            arrays[name][dead, :] = 0
        else:
            arrays[name][:, dead] = 0
        arrays[bias][dead] = 0
    proto = _with_weights(proto, arrays)
    out, _, _ = _prune(proto, method="structured", sparsity=0.25, min_elements=0)
    pruned = _weights(out)
    assert pruned["b0"].shape == pruned["b1"].shape == (48,)
    assert not (pruned["b0"] == 0).any() and not (pruned["b1"] == 0).any()  # exactly the dead neurons went
    assert assert_outputs_close(out, proto, atol=1e-5) < 1e-5


def test_structured_conv_net_with_dead_channels_keeps_outputs() -> None:
    proto = models.conv_net(opset=11, constant_weights=True)  # Constant-node weights, lifted by _prune
    arrays = _lifted_weights(proto)
    arrays["conv0.W"][[1, 5, 9, 12]] = 0
    arrays["conv1.W"][[0, 3, 4, 8, 10, 20, 30, 31]] = 0
    for i, dead in ((0, [1, 5, 9, 12]), (1, [0, 3, 4, 8, 10, 20, 30, 31])):
        arrays[f"bn{i}.bias"][dead] = 0  # BN(0) = 0, so the dead channels really contribute nothing
        arrays[f"bn{i}.mean"][dead] = 0
    lifted = ir.from_proto(proto)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(lifted)
    proto = _with_weights(ir.to_proto(lifted), arrays)
    out, prune, _ = _prune(proto, method="structured", sparsity=0.25, min_elements=0, channel_multiple=1)
    shapes = {name: list(a.shape) for name, a in _weights(out).items()}
    assert shapes["conv0.W"] == [12, 3, 3, 3] and shapes["bn0.var"] == [12]
    assert shapes["conv1.W"] == [24, 12, 3, 3] and shapes["bn1.scale"] == [24]
    assert shapes["fc.W"] == [10, 24]  # Conv -> BN -> Relu -> GlobalAveragePool -> Flatten -> Gemm(transB=1)
    assert assert_outputs_close(out, proto, atol=1e-5) < 1e-5
    assert [c.weight for c in prune.log.layers] == ["conv0.W", "conv1.W", "fc.W"]


def test_structured_skips_layers_that_feed_a_residual_add() -> None:
    proto = models.residual_mlp()
    out, prune, _ = _prune(proto, method="structured", sparsity=0.5, min_elements=0)
    reasons = {s.name: s.reason for s in prune.log.skipped}
    assert reasons["fc_in"] == "output feeds Add 'residual' with another activation (residual)"
    assert reasons["fc_b"] == "output feeds Add 'residual' with another activation (residual)"
    assert reasons["fc_out"] == "output 'logits' reaches a graph output"
    shapes = {name: list(a.shape) for name, a in _weights(out).items()}
    assert shapes == {"W_in": [32, 64], "W_a": [64, 64], "b_a": [64], "W_b": [64, 64], "W_out": [64, 10]}
    assert run(out, random_feeds(out))[0].shape == (4, 10)


def test_structured_follows_silu_maxpool_broadcast_bias_and_depthwise_conv() -> None:
    proto = models.conv_pool_net()
    out, prune, _ = _prune(proto, method="structured", sparsity=0.5, min_elements=0, channel_multiple=1)
    reasons = {s.name: s.reason for s in prune.log.skipped}
    assert "conv_b" not in reasons  # its channels go through the depthwise conv_dw to fc
    assert reasons["conv_dw"] == "grouped or depthwise Conv"
    assert reasons["fc"] == "output 'logits' reaches a graph output"
    shapes = {name: list(a.shape) for name, a in _weights(out).items()}
    assert shapes["Wa"] == [8, 3, 3, 3] and shapes["Ba"] == [8] and shapes["Wb"] == [16, 8, 3, 3]
    assert shapes["Bb"] == [1, 16, 1, 1] and shapes["lo"] == [] and shapes["Wdw"] == [16, 1, 3, 3]
    assert shapes["Wfc"] == [16, 10]
    groups = {n.name: a.i for n in out.graph.node for a in n.attribute if a.name == "group"}
    assert groups["conv_dw"] == 16
    assert run(out, random_feeds(out))[0].shape == (4, 10)


def test_structured_follows_batchnorm_and_decomposed_gelu_exactly() -> None:
    proto = models.gelu_bn_mlp()
    arrays = _weights(proto)
    dead = [2, 7, 11, 19, 23, 40, 41, 63]
    arrays["W1"][:, dead] = 0
    arrays["bn.bias"][dead] = 0
    arrays["bn.mean"][dead] = 0
    proto = _with_weights(proto, arrays)
    out, prune, _ = _prune(proto, method="structured", sparsity=0.125, norm="l1", min_elements=0)
    shapes = {name: list(a.shape) for name, a in _weights(out).items()}
    assert shapes["W1"] == [32, 56] and shapes["bn.scale"] == [56] and shapes["W2"] == [56, 10]
    assert shapes["sqrt2"] == shapes["half"] == []
    assert assert_outputs_close(out, proto, atol=1e-5) < 1e-5
    assert prune.log.summary["neurons_removed"] == 8


def test_structured_skips_shared_weights_and_recurrent_nodes() -> None:
    model = ir.from_proto(_shared_weight_model())
    shared = MagnitudePrunePass(PruneStep(method="structured", min_elements=0), PassContext(workdir=Path(".")))
    with pytest.raises(PlanError, match="shared by 2 nodes"):
        shared.precheck(model)
    recurrent = MagnitudePrunePass(PruneStep(method="structured", min_elements=0), PassContext(workdir=Path(".")))
    model = ir.from_proto(models.lstm())
    with pytest.raises(PlanError, match="LSTM is not structurally pruned"):
        recurrent.precheck(model)
    assert not recurrent(model).modified
    assert [s.name for s in recurrent.log.skipped] == ["lstm", "head"]


def test_structured_with_too_few_neurons_to_remove_is_refused() -> None:
    prune = MagnitudePrunePass(PruneStep(method="structured", sparsity=0.001), PassContext(workdir=Path(".")))
    with pytest.raises(PlanError, match="removes none"):
        prune.precheck(ir.from_proto(models.mlp()))


@pytest.mark.parametrize("builder", [models.gelu_bn_mlp, models.conv_pool_net])
def test_structured_updates_declared_shapes_of_intermediate_values(builder: object) -> None:
    assert callable(builder)
    proto = onnx.shape_inference.infer_shapes(builder(), strict_mode=True)
    declared = {v.name for v in proto.graph.value_info}
    assert {"zn", "dr_mask"} <= declared or {"silu_a", "pa"} <= declared
    out, _, _ = _prune(proto, method="structured", sparsity=0.5, min_elements=0, channel_multiple=1)
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info}
    if "zn" in declared:
        assert dims["zn"] == ["N", 32] and dims["g"] == ["N", 32]
        assert "dr_mask" not in dims or not dims["dr_mask"]  # the unused mask's stale shape is dropped
    else:
        assert dims["silu_a"] == ["N", 8, 16, 16] and dims["pa"] == ["N", 8, 8, 8]
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    run(out, random_feeds(out))


def test_structured_leaves_layer_alone_when_a_chain_node_is_excluded() -> None:
    model = ir.from_proto(models.gelu_bn_mlp())
    prune = MagnitudePrunePass(
        PruneStep(method="structured", exclude_nodes=["bn"], min_elements=0), PassContext(workdir=Path("."))
    )
    with pytest.raises(PlanError, match="'bn', which is in exclude_nodes"):
        prune.precheck(model)
    assert not prune(model).modified


def test_structured_shrinks_every_consumer_of_a_shared_activation() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    w[:, :8] = 0  # 8 dead neurons: Relu(0) = 0 feeds nothing into either consumer
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["z"], name="fc"),
            helper.make_node("Relu", ["z"], ["h"], name="relu"),
            helper.make_node("MatMul", ["h", "A"], ["a"], name="left"),
            helper.make_node("MatMul", ["h", "B"], ["b"], name="right"),
            helper.make_node("Add", ["a", "b"], ["y"], name="join"),
        ],
        "two_consumers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "A"),
            numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "B"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, prune, _ = _prune(proto, method="structured", sparsity=0.25, min_elements=0)
    assert {name: a.shape for name, a in _weights(out).items()} == {"W": (16, 24), "A": (24, 8), "B": (24, 8)}
    assert {s.name for s in prune.log.skipped} == {"left", "right"}
    assert "shrank the input of left, right" in prune.log.layers[0].note
    assert assert_outputs_close(out, proto, atol=1e-5) < 1e-5


def _weights_with_ties() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [
        rng.standard_normal((50, 40)).astype(np.float32),
        (0.1 * rng.standard_normal(300)).astype(np.float32),
        np.zeros((10, 10), np.float32),  # 100 ties at zero
        np.round(rng.standard_normal((20, 20)), 1).astype(np.float32),  # many ties everywhere
        -np.ones(7, np.float32) * 1e-30,  # subnormal-free tiny values
    ]


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.3, 0.5, 0.97, 1.0])
def test_global_cut_zeroes_exactly_the_smallest_magnitudes_reading_one_weight_at_a_time(fraction: float) -> None:
    arrays = _weights_with_ties()
    reads: list[int] = []

    def one_at_a_time():
        for index, array in enumerate(arrays):
            reads.append(index)
            yield array

    cut = _masks.global_cut(one_at_a_time, fraction)
    assert reads == [0, 1, 2, 3, 4] * (2 if fraction else 1)  # at most two passes, one weight at a time
    masks = [cut.mask(np.abs(a)) for a in arrays]
    total = sum(a.size for a in arrays)
    assert sum(int(m.sum()) for m in masks) == round(fraction * total)
    zeroed = np.concatenate([np.abs(a)[m] for a, m in zip(arrays, masks, strict=True)])
    kept = np.concatenate([np.abs(a)[~m] for a, m in zip(arrays, masks, strict=True)])
    if zeroed.size and kept.size:
        assert zeroed.max() <= kept.min()


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_smallest_zeroes_exactly_round_fraction_of_a_weight_with_ties(fraction: float) -> None:
    for array in _weights_with_ties():
        magnitudes = np.abs(array)
        mask = _masks.smallest(magnitudes, fraction)
        assert mask.shape == array.shape and int(mask.sum()) == round(fraction * array.size)
        if 0 < mask.sum() < mask.size:
            assert magnitudes[mask].max() <= magnitudes[~mask].min()
