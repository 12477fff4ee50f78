"""Dynamic int8 with calibration data: activation smoothing, per-column embedding tables, GPTQ re-rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime import quantization as ortq

from onnx_ops.capture import Session
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.quantize import QuantizePass, dynamic_rounding, embeddings, smoothing
from onnx_ops.plan import QuantizeStep

import models

Feeds = list[dict[str, np.ndarray]]


def _encoder(rng: np.random.Generator) -> onnx.ModelProto:
    """A small transformer block: ids -> embedding table -> LayerNorm -> FFN (MatMul, Relu, MatMul) + residual.

    The table's columns and the LayerNorm's scale span two orders of magnitude, as a trained BERT's do: a few
    outlier channels set the range of the whole tensor.
    """
    width, hidden, vocab = 32, 96, 64
    spread = np.exp(rng.uniform(-2.5, 2.0, size=width))
    table = (rng.normal(size=(vocab, width)) * spread).astype(np.float32)
    gamma = np.ones(width, np.float32)
    gamma[:3] = [30.0, -25.0, 20.0]  # outlier channels
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array((rng.normal(size=width) * 0.1).astype(np.float32), "beta"),
        numpy_helper.from_array((rng.normal(size=(width, hidden)) / np.sqrt(width)).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.normal(size=hidden) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.normal(size=(hidden, width)) / np.sqrt(hidden)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("LayerNormalization", ["emb", "gamma", "beta"], ["x"], name="norm", axis=-1),
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="act"),
        helper.make_node("MatMul", ["h", "w2"], ["f"], name="fc2"),
        helper.make_node("Add", ["f", "x"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, width])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(rng: np.random.Generator, count: int) -> Feeds:
    return [{"ids": rng.integers(0, 64, size=(2, 16)).astype(np.int64)} for _ in range(count)]


@pytest.fixture(scope="module")
def setting() -> tuple[onnx.ModelProto, Feeds, Feeds]:
    rng = np.random.default_rng(0)
    return _encoder(rng), _feeds(rng, 8), _feeds(rng, 6)


def _error(model: onnx.ModelProto, student: onnx.ModelProto, feeds: Feeds, name: str = "y") -> float:
    """Relative squared error of the student's output against the float model's on the feeds."""
    want, got = Session(model, [name]), Session(student, [name])
    pairs = [(want.run(f)[name].astype(np.float64), got.run(f)[name].astype(np.float64)) for f in feeds]
    return sum(float(np.sum((w - g) ** 2)) for w, g in pairs) / sum(float(np.sum(w**2)) for w, _ in pairs)


def _quantized(model: onnx.ModelProto, calibration: Feeds | None, workdir: Path, **fields: object) -> QuantizePass:
    workdir.mkdir()
    qpass = QuantizePass(
        QuantizeStep(speed_check=False, **fields), PassContext(workdir=workdir, calibration=calibration)
    )
    qpass.result = ir.to_proto(qpass(ir.from_proto(model)).model)  # type: ignore[attr-defined]
    return qpass


def _smoothed(
    model: onnx.ModelProto, feeds: Feeds, folder: Path, **options: object
) -> tuple[onnx.ModelProto, smoothing.Outcome]:
    """The float model smoothed in the IR (statistics from one session over a file in `folder`)."""
    work = ir.from_proto(model)
    found = smoothing.groups(work)
    stats = smoothing.statistics(work, list(found), feeds, folder)
    assert not list(folder.iterdir())  # its files are removed
    outcome = smoothing.smooth(work, found, stats, **options)  # type: ignore[arg-type]
    return ir.to_proto(work), outcome


def test_smoothing_keeps_the_float_function(setting: tuple[onnx.ModelProto, Feeds, Feeds], tmp_path: Path) -> None:
    model, calibration, held_out = setting
    smoothed, outcome = _smoothed(model, calibration, tmp_path, wide=True, alpha=0.5)
    assert list(outcome.alphas) == ["x", "h"]
    assert sum(node.op_type == "Mul" for node in smoothed.graph.node) == 2
    assert _error(model, smoothed, held_out) < 1e-10
    # h (96 channels) feeds fc2 (32 outputs): by default its Mul is not worth its time.
    assert list(_smoothed(model, calibration, tmp_path, alpha=0.5)[1].alphas) == ["x"]


def test_strengths_are_chosen_per_activation_from_the_estimated_error(
    setting: tuple[onnx.ModelProto, Feeds, Feeds], tmp_path: Path
) -> None:
    """The estimate picks x's strength; on the outlier channels of x smoothing lowers the estimate a lot."""
    model, calibration, _ = setting
    _, outcome = _smoothed(model, calibration, tmp_path, wide=True)
    assert "x" in outcome.alphas and outcome.alphas["x"] in smoothing.ALPHAS
    assert outcome.ratios[list(outcome.alphas).index("x")] < 0.5
    assert str(outcome.summary()["smoothing"]).startswith(f"{len(outcome.alphas)} activations, alpha ")


def test_smoothing_brings_dynamic_int8_closer_to_float_on_held_out_inputs(
    setting: tuple[onnx.ModelProto, Feeds, Feeds], tmp_path: Path
) -> None:
    model, calibration, held_out = setting
    smoothed = _quantized(model, calibration, tmp_path / "auto")
    plain = _quantized(model, calibration, tmp_path / "off", smoothing="off")
    assert " activations, alpha " in str(smoothed.log.summary["smoothing"])
    assert "smoothing" not in plain.log.summary
    assert smoothed.log.summary["quantizer"] == plain.log.summary["quantizer"]  # one path: the pass's own
    errors = {name: _error(model, q.result, held_out, "f") for name, q in [("auto", smoothed), ("off", plain)]}  # type: ignore[attr-defined]
    assert errors["auto"] < 0.5 * errors["off"], errors


def test_embedding_tables_get_one_scale_per_column(
    setting: tuple[onnx.ModelProto, Feeds, Feeds], tmp_path: Path
) -> None:
    model, _, held_out = setting
    source, target = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(model, source)
    ortq.quantize_dynamic(str(source), str(target), per_channel=True, weight_type=ortq.QuantType.QInt8)
    ort_model = onnx.load(target)
    rewritten = onnx.load(target)
    assert embeddings.per_column_tables(rewritten, model) == ["table"]
    scales = {init.name: list(init.dims) for init in rewritten.graph.initializer if init.name.endswith("_scale")}
    assert scales["table_scale"] == [32]
    before, after = _error(model, ort_model, held_out, "emb"), _error(model, rewritten, held_out, "emb")
    assert after < 0.2 * before, (before, after)


def test_gptq_rounding_keeps_ort_scales_and_changes_only_levels(
    setting: tuple[onnx.ModelProto, Feeds, Feeds], tmp_path: Path
) -> None:
    model, calibration, _ = setting
    qpass = _quantized(model, calibration, tmp_path / "q", smoothing="off")
    student = qpass.result  # type: ignore[attr-defined]
    rounded, outcome = dynamic_rounding.round_weights(model, student, calibration)
    # fc1 and fc2: with smoothing off the pass quantizes the MatMuls itself (no preprocessing merges fc1's bias)
    assert outcome.layers == 2 and outcome.gptq_error < outcome.nearest_error
    before = {init.name: numpy_helper.to_array(init) for init in student.graph.initializer}
    after = {init.name: numpy_helper.to_array(init) for init in rounded.graph.initializer}
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed == {"w1_quantized", "w2_quantized"}
    assert outcome.kept == (outcome.cosine_after > outcome.cosine_before)  # type: ignore[operator]


def _attention(rng: np.random.Generator) -> onnx.ModelProto:
    """x [2, 8, 16] -> V = x Wv + bv, split in 2 heads -> softmax(scores) V -> merged -> MatMul Wo -> y."""
    width, heads = 16, 2
    inits = [
        numpy_helper.from_array((rng.normal(size=(width, width)) / 4).astype(np.float32), "wv"),
        numpy_helper.from_array((rng.normal(size=width) * 0.1).astype(np.float32), "bv"),
        numpy_helper.from_array((rng.normal(size=(width, width)) / 4).astype(np.float32), "wo"),
        numpy_helper.from_array(np.array([2, 8, heads, width // heads], np.int64), "split"),
        numpy_helper.from_array(np.array([2, 8, width], np.int64), "merge"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wv"], ["v0"], name="value"),
        helper.make_node("Add", ["bv", "v0"], ["v1"], name="value_bias"),
        helper.make_node("Reshape", ["v1", "split"], ["v2"], name="split_heads"),
        helper.make_node("Transpose", ["v2"], ["v"], name="heads_first", perm=[0, 2, 1, 3]),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["c0"], name="attend"),
        helper.make_node("Transpose", ["c0"], ["c1"], name="heads_back", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["c1", "merge"], ["context"], name="merge_heads"),
        helper.make_node("MatMul", ["context", "wo"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, width]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, heads, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, width])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_smoothing_of_the_attention_context_folds_into_the_value_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    model = _attention(rng)
    feeds = [
        {"x": (rng.normal(size=(2, 8, 16)) * np.geomspace(0.1, 30, 16)).astype(np.float32),
         "scores": rng.normal(size=(2, 2, 8, 8)).astype(np.float32)}
        for _ in range(4)
    ]  # fmt: skip
    smoothed, outcome = _smoothed(model, feeds[:2], tmp_path, alpha=0.5)
    assert list(outcome.alphas) == ["x", "context"] and outcome.folded == ["context"]
    assert [node.name for node in smoothed.graph.node if node.op_type == "Mul"] == ["x_smoothed"]  # context folded
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    assert not np.allclose(before["bv"], after["bv"]) and not np.allclose(before["wo"], after["wo"])
    assert _error(model, smoothed, feeds[2:]) < 1e-10


def test_quantize_step_runs_gptq_rounding_when_asked(
    setting: tuple[onnx.ModelProto, Feeds, Feeds], tmp_path: Path
) -> None:
    model, calibration, _ = setting
    qpass = _quantized(model, calibration, tmp_path / "q", dynamic_rounding="gptq")
    # The pass's own quantizer (one path with smoothing), fc1 and fc2 (ORT's preprocessing merged fc1's bias).
    assert str(qpass.log.summary["quantizer"]).startswith("own")
    assert str(qpass.log.summary["dynamic_rounding"]).startswith("gptq on 2 MatMul weights")
    nearest = _quantized(model, calibration, tmp_path / "n")
    assert "dynamic_rounding" not in nearest.log.summary
    levels = [
        {i.name: numpy_helper.to_array(i) for i in q.result.graph.initializer if i.name.endswith("_quantized")}  # type: ignore[attr-defined]
        for q in (qpass, nearest)
    ]
    changed = [name for name in levels[1] if not np.array_equal(levels[0][name], levels[1][name])]
    assert bool(changed) == ("not kept" not in str(qpass.log.summary["dynamic_rounding"])), changed


def test_statistics_are_each_feeds_channel_range_and_the_mean_square(
    setting: tuple[onnx.ModelProto, Feeds, Feeds], tmp_path: Path
) -> None:
    model, calibration, _ = setting
    work = ir.from_proto(model)
    stats = smoothing.statistics(work, ["x", "h"], calibration[:3], tmp_path)
    values = [Session(model, ["x"]).run(feed)["x"].reshape(-1, 32).astype(np.float64) for feed in calibration[:3]]
    assert np.allclose(stats["x"].high, [v.max(axis=0) for v in values])
    assert np.allclose(stats["x"].low, [v.min(axis=0) for v in values])
    assert np.allclose(stats["x"].mean_square, np.mean(np.concatenate(values) ** 2, axis=0))
    assert stats["h"].high.shape == (3, 96) and stats["x"].rows == 3 * 32 and stats["x"].finite()


def test_smoothing_reaches_models_that_onnx_runtime_quantizes(tmp_path: Path) -> None:
    """Gemm (transB) layers go to ORT's quantizer: their inputs are smoothed in the IR first."""
    model = models.mlp(gemm=True)
    rng = np.random.default_rng(3)
    scales = np.geomspace(0.05, 20, 64)
    calibration = [{"x": (rng.normal(size=(4, 64)) * scales).astype(np.float32)} for _ in range(10)]
    smoothed = _quantized(model, calibration[:8], tmp_path / "q", smoothing="all")
    plain = _quantized(model, calibration[:8], tmp_path / "p", smoothing="off")
    assert str(smoothed.log.summary["quantizer"]).startswith("onnxruntime: it rewrites Gemm")
    assert " activations, alpha " in str(smoothed.log.summary["smoothing"])
    name = model.graph.output[0].name
    errors = [_error(model, q.result, calibration[8:], name) for q in (smoothed, plain)]  # type: ignore[attr-defined]
    assert errors[0] < errors[1], errors


def test_gptq_rounding_on_onnx_runtimes_path(setting: tuple[onnx.ModelProto, Feeds, Feeds], tmp_path: Path) -> None:
    model, calibration, _ = setting
    qpass = _quantized(model, calibration, tmp_path / "q", dynamic_rounding="gptq", preprocess="on")
    assert str(qpass.log.summary["quantizer"]).startswith("onnxruntime: preprocess")
    assert str(qpass.log.summary["dynamic_rounding"]).startswith("gptq on 1 MatMul weights")


def test_layers_left_in_float_are_not_smoothed(setting: tuple[onnx.ModelProto, Feeds, Feeds], tmp_path: Path) -> None:
    model, calibration, _ = setting
    qpass = _quantized(model, calibration, tmp_path / "q", op_types=["Gather"], smoothing="all")
    assert qpass.log.summary["smoothing"] == "no MatMul with a constant weight to smooth"
    assert not any(node.op_type == "Mul" for node in qpass.result.graph.node)  # type: ignore[attr-defined]
