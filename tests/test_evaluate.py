"""The report's measurements: agreement metrics, top-1, accuracy, model statistics, latency."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from onnx_ops.agreement import measure_agreement
from onnx_ops.evaluate import Runner, accuracy, agreement, measure_latency, model_stats

import models


def test_agreement_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    ref = [[rng.standard_normal((4, 10)).astype(np.float32)] for _ in range(3)]
    new = [[r[0] + 0.1 * rng.standard_normal((4, 10)).astype(np.float32)] for r in ref]
    (out,) = agreement(["y"], ref, new)
    a = np.concatenate([r[0].ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([n[0].ravel() for n in new]).astype(np.float64)
    assert out.max_abs_err == pytest.approx(np.abs(a - b).max())
    assert out.mean_abs_err == pytest.approx(np.abs(a - b).mean())
    assert out.cosine == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert out.snr_db == pytest.approx(10 * math.log10((a @ a) / ((a - b) @ (a - b))))
    expected_top1 = np.mean(np.concatenate([r[0].argmax(1) == n[0].argmax(1) for r, n in zip(ref, new, strict=True)]))
    assert out.top1_agreement == pytest.approx(expected_top1)


def test_top1_for_per_position_probabilities_but_not_for_features():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 5, 7))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    flipped = probs[..., ::-1].copy()
    (out,) = agreement(["p"], [[probs]], [[flipped]])
    assert out.top1_agreement == pytest.approx(np.mean(probs.argmax(-1) == flipped.argmax(-1)))
    features = rng.standard_normal((2, 5, 7))
    (feat,) = agreement(["h"], [[features]], [[features]])
    assert feat.top1_agreement is None and feat.snr_db == math.inf and feat.cosine == pytest.approx(1.0)


def test_label_outputs_get_exact_agreement_and_zipmap_outputs_top1():
    labels = [[np.array([1, 2, 3], np.int64), [{0: 0.2, 1: 0.8}, {0: 0.6, 1: 0.4}, {0: 0.4, 1: 0.6}]]]
    other = [[np.array([1, 2, 0], np.int64), [{0: 0.2, 1: 0.8}, {0: 0.6, 1: 0.4}, {0: 0.9, 1: 0.1}]]]
    meter = measure_agreement(["label", "probabilities"], labels, other)
    (proba,) = meter.floating()
    (label,) = meter.exact()
    assert proba.name == "probabilities" and proba.top1_agreement == pytest.approx(2 / 3)
    assert label.name == "label" and label.exact_agreement == pytest.approx(2 / 3) and label.samples_equal == 0.0
    # agreement() is the float outputs only: a distance between class ids means nothing.
    assert [o.name for o in agreement(["label", "probabilities"], labels, other)] == ["probabilities"]


def test_integer_output_of_a_real_model_gets_exact_agreement_not_cosine():
    """ArgMax gives class ids: exact agreement against ONNX Runtime's own outputs, no cosine, SNR or error."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 5])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, ["N"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("ArgMax", ["x"], ["y"], axis=1, keepdims=0)], "g", [x], [y])
    runner = Runner(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    rng = np.random.default_rng(3)
    feeds = [rng.standard_normal((4, 5)).astype(np.float32) for _ in range(6)]
    ref = [runner.run({"x": f}) for f in feeds]
    # The "compressed" inputs: every other sample has its rows' largest score moved to column 0.
    moved = [f.copy() for f in feeds]
    for f in moved[::2]:
        f[:, 0] = f.max(axis=1) + 1
    new = [runner.run({"x": f}) for f in moved]
    meter = measure_agreement(["y"], ref, new)
    assert meter.floating() == []
    (exact,) = meter.exact()
    want = np.concatenate([a[0] == b[0] for a, b in zip(ref, new, strict=True)])
    assert exact.samples == 6 and exact.elements == 24
    assert exact.exact_agreement == pytest.approx(want.mean()) and exact.exact_agreement < 1
    assert exact.samples_equal == pytest.approx(
        np.mean([np.array_equal(a[0], b[0]) for a, b in zip(ref, new, strict=True)])
    )


def test_per_sample_cosines_show_the_samples_a_pooled_cosine_hides():
    """Two of 40 samples collapse: the pooled cosine stays high, the 5th percentile and the minimum do not."""
    rng = np.random.default_rng(4)
    ref = [[rng.standard_normal((1, 64)).astype(np.float32) * (10 if i % 2 else 1)] for i in range(40)]
    new = [[r[0] + 0.01 * rng.standard_normal((1, 64)).astype(np.float32)] for r in ref]
    for i in (0, 2):  # two quiet samples replaced by noise
        new[i] = [rng.standard_normal((1, 64)).astype(np.float32)]
    (out,) = agreement(["y"], ref, new)
    per = [
        float(a[0].ravel() @ b[0].ravel() / np.linalg.norm(a[0]) / np.linalg.norm(b[0]))
        for a, b in zip(ref, new, strict=True)
    ]
    assert out.cosine > 0.99 and out.samples == 40 and out.cosine_units == 40
    assert out.cosine_min == pytest.approx(min(per), abs=1e-6) and out.cosine_min < 0.5
    assert out.cosine_p5 == pytest.approx(sorted(per)[1], abs=1e-6) and out.cosine_p5 < 0.5
    assert out.cosine_mean == pytest.approx(np.mean(per), abs=1e-6)


def test_batched_runs_give_one_cosine_per_row():
    rng = np.random.default_rng(5)
    ref = [[rng.standard_normal((8, 10)).astype(np.float32)] for _ in range(3)]
    new = [[r[0].copy()] for r in ref]
    new[1][0][3] = -new[1][0][3]  # one row of one run flipped: cosine -1 for that row only
    (out,) = agreement(["y"], ref, new)
    assert out.cosine_units == 24 and out.cosine_min == pytest.approx(-1.0) and out.cosine_p5 == pytest.approx(1.0)


def test_accuracy_uses_argmax_of_class_scores():
    scores = [[np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)], [np.array([[0.3, 0.7], [0.4, 0.6]], np.float32)]]
    worse = [[np.array([[0.9, 0.1], [0.8, 0.2]], np.float32)], [np.array([[0.3, 0.7], [0.4, 0.6]], np.float32)]]
    labels = np.array([[1, 0], [1, 1]])
    acc = accuracy(["y"], labels, scores, worse)
    assert acc is not None and acc.before == 1.0 and acc.after == 0.75 and acc.drop_points == pytest.approx(25.0)


def test_model_stats_count_constant_node_tensors_and_zeros():
    model = models.conv_net(constant_weights=True)
    stats = model_stats(model)
    expected = 16 * 3 * 9 + 32 * 16 * 9 + 10 * 32 + 4 * (16 + 32) + 10
    assert stats.parameters == expected
    assert stats.op_counts["Constant"] == 3 and stats.opset == 11
    assert stats.size_bytes == len(model.SerializeToString())


def test_latency_is_measured_for_both_models():
    model = models.mlp()
    first, second = Runner(model), Runner(model.SerializeToString())
    a, b = measure_latency(first, second, {"x": np.ones((1, 64), np.float32)}, runs=7, warmup=1)
    assert a.runs == b.runs == 7 and 0 < a.p50_ms <= a.p90_ms <= a.p99_ms


def test_runner_refuses_model_onnxruntime_cannot_load():
    model = models.linear()
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(Exception, match="ONNX Runtime cannot load the model"):
        Runner(onnx.ModelProto.FromString(model.SerializeToString()))
