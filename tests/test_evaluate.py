"""The report's measurements: agreement metrics, top-1, accuracy, model statistics, latency."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

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


def test_label_outputs_and_zipmap_outputs_are_compared():
    labels = [[np.array([1, 2, 3], np.int64), [{0: 0.2, 1: 0.8}, {0: 0.6, 1: 0.4}, {0: 0.4, 1: 0.6}]]]
    other = [[np.array([1, 2, 0], np.int64), [{0: 0.2, 1: 0.8}, {0: 0.6, 1: 0.4}, {0: 0.9, 1: 0.1}]]]
    label, proba = agreement(["label", "probabilities"], labels, other)
    assert label.top1_agreement == pytest.approx(2 / 3)
    assert proba.top1_agreement == pytest.approx(2 / 3)


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
