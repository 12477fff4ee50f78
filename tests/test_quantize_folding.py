"""Exact folds before static int8 (onnx_ops.passes.quantize.folding) on a real PP-OCRv4 recogniser: real ORT runs."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_ir.passes import common

from onnx_ops.capture import Session
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.quantize import QuantizePass
from onnx_ops.passes.quantize.folding import fold
from onnx_ops.plan import QuantizeStep
from tests import real_models

_KEY = "rapidocr_rec"


@pytest.fixture(scope="module")
def recogniser() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    path = real_models.locate(_KEY)
    if path is None:
        pytest.skip(f"{_KEY} is not installed")
    model = ir.load(path)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    return ir.to_proto(model), real_models.sample_feeds(_KEY, 2, seed=3)


def _counts(proto: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in proto.graph.node)


def test_fold_removes_affine_blocks_and_hard_swish_and_keeps_the_outputs(recogniser: tuple) -> None:
    proto, feeds = recogniser
    folded = onnx.ModelProto()
    folded.CopyFrom(proto)
    done = fold(folded)
    before, after = _counts(proto), _counts(folded)
    # 28 hard-swish as Add, Clip, Mul, Div; learnable affine blocks (Mul, Add) after Convs and activations.
    assert done["hard_swish"] == 28 and done["conv_affine"] >= 50 and done["scale_past_shift"] >= 10, done
    assert after["Clip"] == 0 and after["Conv"] == before["Conv"]
    assert after["Mul"] + after["Add"] + after["Div"] <= before["Mul"] + before["Add"] + before["Div"] - 120
    onnx.checker.check_model(folded)
    want, got = Session(proto, ()), Session(folded, ())
    for feed in feeds:
        for name, value in want.run(feed).items():
            np.testing.assert_allclose(got.run(feed)[name], value, atol=1e-4, rtol=1e-3)


def test_static_quantize_folds_by_default_and_fold_affine_false_keeps_the_graph(
    recogniser: tuple, tmp_path: Path
) -> None:
    proto, feeds = recogniser
    counts = {}
    for fold_affine in (True, False):
        step = QuantizeStep(mode="static", op_types=["Conv"], recovery="off", preprocess="off", fold_affine=fold_affine)
        workdir = tmp_path / str(fold_affine)
        workdir.mkdir()
        qpass = QuantizePass(step, PassContext(workdir=workdir, calibration=feeds))
        result = ir.to_proto(qpass(ir.from_proto(proto)).model)
        counts[fold_affine] = (_counts(result), qpass.log.summary.get("folded"))
    (folded, note), (kept, none) = counts[True], counts[False]
    assert note is not None and "hard_swish x28" in note and none is None
    assert folded["Clip"] == 0 < kept["Clip"]
    assert folded["Div"] < kept["Div"] and folded["Mul"] < kept["Mul"]


@pytest.mark.parametrize("shape", [(4,), (1, 1, 1, 1, 1)])
def test_fold_leaves_constants_that_do_not_broadcast_per_output_channel(shape: tuple[int, ...]) -> None:
    # [4] broadcasts along the width of a [1, 4, 4, 4] output, [1, 1, 1, 1, 1] raises its rank: neither folds.
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.normal(size=(4, 2, 1, 1)).astype(np.float32), "w")
    scale = onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), "s")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            onnx.helper.make_node("Mul", ["c", "s"], ["y"], name="mul"),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [weight, scale],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    assert fold(proto) == {} and [node.op_type for node in proto.graph.node] == ["Conv", "Mul"]
