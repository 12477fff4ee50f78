"""Block-wise refinement of FFN blocks (MatMul + bias, erf GELU, MatMul + bias) after distill's layer-wise refit."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.pipeline import compress
from onnx_ops.report import Report


def _ffn(seed: int = 0, k: int = 16, hidden: int = 64) -> onnx.ModelProto:
    """x [N, S, k] -> MatMul + bias -> GELU as PyTorch exports it (Div, Erf, Add, Mul, Mul) -> MatMul + bias.

    The output is zero at the padded positions (attention_mask 0), as a user's masked pooling ignores them.
    """
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((k, hidden)) / math.sqrt(k),
        "b1": rng.standard_normal(hidden) * 0.5,
        "w2": rng.standard_normal((hidden, k)) / math.sqrt(hidden),
        "b2": rng.standard_normal(k) * 0.1,
        "sqrt2": np.array(math.sqrt(2.0)),
        "one": np.array(1.0),
        "half": np.array(0.5),
        "last": np.array([-1]),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="up"),
        helper.make_node("Add", ["b1", "m1"], ["a1"]),
        helper.make_node("Div", ["a1", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["a1", "e1"], ["g0"]),
        helper.make_node("Mul", ["g0", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["m2"], name="down"),
        helper.make_node("Add", ["m2", "b2"], ["o"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["o", "mask3"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ffn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", k]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "S", k])],
        [numpy_helper.from_array(a if name == "last" else a.astype(np.float32), name) for name, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tokens(feeds: int, seed: int, k: int = 16) -> dict[str, np.ndarray]:
    """Feeds of [4, 12] token vectors, correlated as real features are; padded positions hold other vectors."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(7).standard_normal((6, k))
    x = rng.standard_normal((feeds, 4, 12, 6)) @ mixing + 0.2 * rng.standard_normal((feeds, 4, 12, k))
    mask = (np.arange(12) < rng.integers(4, 13, (feeds, 4, 1))).astype(np.int64)
    x = np.where(mask[..., None] == 1, x, 3.0)
    return {"x": x.astype(np.float32), "attention_mask": mask}


def _real_gap(model: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """1 - cosine of the output over the real (unpadded) positions."""
    import onnxruntime as ort

    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, candidate)]
    mask = feeds["attention_mask"] == 1
    outputs = [
        [r.run(None, {"x": x, "attention_mask": m})[0] for x, m in zip(*feeds.values(), strict=True)] for r in run
    ]
    a, b = (np.stack(o)[mask].ravel() for o in outputs)
    return 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _distill(model: onnx.ModelProto, block_steps: int) -> tuple[onnx.ModelProto, Report]:
    prune = {"kind": "prune", "sparsity": 0.5, "op_types": ["MatMul"], "min_elements": 0}
    distill = {"kind": "distill", "min_elements": 0, "block_steps": block_steps}
    result = compress(model, {"steps": [prune, distill]}, calibration=_tokens(48, 1))
    return result.model, result.report


def test_block_refinement_beats_the_layer_wise_refit_on_held_out_tokens_and_keeps_the_zeros() -> None:
    model = _ffn()
    held_out = _tokens(16, 2)
    layer_wise, _ = _distill(model, 0)
    refined, report = _distill(model, 200)
    summary = report.steps[1].summary
    assert summary["blocks_refined"] == 1, summary.get("blocks")
    assert _real_gap(model, refined, held_out) < 0.9 * _real_gap(model, layer_wise, held_out)
    before = {t.name: numpy_helper.to_array(t) for t in layer_wise.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in refined.graph.initializer}
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(before[name] == 0, after[name] == 0, err_msg=name)
        assert not np.array_equal(before[name], after[name])
