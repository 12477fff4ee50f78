"""Per-output-channel k-means codebooks (cluster step, codebook: channel)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnx_ops import compress
from onnx_ops.errors import PlanError
from onnx_ops.passes._channel_codebook import kmeans_channels, output_axis
from onnx_ops.passes._kmeans import kmeans_1d
from onnx_ops.pipeline import parse_plan
from tests import models

FAST = {"latency_runs": 2, "latency_seconds": 0.0, "warmup_runs": 1}


def test_channels_of_different_scales_each_get_their_own_centroids() -> None:
    rng = np.random.default_rng(0)
    scales = np.geomspace(0.01, 1.0, 8).reshape(8, 1, 1, 1)  # a depthwise-like layer: channels 100x apart
    weight = (rng.standard_normal((8, 4, 3, 3)) * scales).astype(np.float32)
    found = kmeans_channels(weight, 0, 16)
    assert found.offsets.shape == (8, 1, 1, 1) and found.indices.shape == weight.shape
    assert found.codebook.size == 8 * 16 and found.offsets.ravel().tolist() == list(range(0, 128, 16))
    layer = kmeans_1d(weight, 16)

    def worst(restored: np.ndarray) -> float:  # the worst channel's relative error
        return max(float(np.linalg.norm(restored[c] - weight[c]) / np.linalg.norm(weight[c])) for c in range(8))

    assert worst(found.restored()) < worst(layer.codebook[layer.indices].reshape(weight.shape)) / 2


def test_a_channel_with_few_distinct_values_stores_only_those() -> None:
    weight = np.array([[1.0, 1.0, 2.0, 2.0], [0.1, 0.2, 0.3, 0.4]], np.float32)
    found = kmeans_channels(weight, 0, 4)
    assert found.codebook.tolist() == pytest.approx([1.0, 2.0, 0.1, 0.2, 0.3, 0.4])
    assert found.offsets.ravel().tolist() == [0, 2]
    np.testing.assert_array_equal(found.restored(), weight)


def test_output_axis_follows_each_operator() -> None:
    gemm = ir.node("Gemm", [], attributes={"transB": 1})
    assert output_axis(gemm, 1, 2) == 0 and output_axis(ir.node("Gemm", []), 1, 2) == 1
    assert output_axis(ir.node("Conv", []), 1, 4) == 0
    assert output_axis(ir.node("MatMul", []), 1, 2) == 1 and output_axis(ir.node("MatMul", []), 0, 3) == 1
    assert output_axis(ir.node("Gather", []), 0, 2) == 1


def test_channel_codebooks_are_decoded_at_load_more_accurate_and_counted_in_the_size() -> None:
    model = models.conv_net(constant_weights=False)
    data = {"image": np.random.default_rng(0).standard_normal((4, 2, 3, 16, 16)).astype(np.float32)}
    results = {}
    for codebook in ("layer", "channel"):
        step = {"kind": "cluster", "bits": 4, "min_elements": 256, "codebook": codebook}
        results[codebook] = compress(model, {"steps": [step], "evaluation": FAST}, evaluation=data)
    layer, channel = results["layer"].report, results["channel"].report
    summary = channel.steps[0].summary
    assert summary["folded_at_load"] is True and summary["weights_clustered"] == 3
    for a, b in zip(layer.steps[0].layers, channel.steps[0].layers, strict=True):
        assert (b.rel_error or 1) < (a.rel_error or 1), (a, b)
    assert channel.agreement.outputs[0].cosine > layer.agreement.outputs[0].cosine
    # conv0 16 x 27, conv1 32 x 144, fc 10 x 32: 4-bit indices, 16 float centroids and an int32 offset a channel.
    assert summary["weight_bytes_after"] == (16 * 27 + 32 * 144 + 10 * 32) // 2 + (16 + 32 + 10) * (16 * 4 + 4)
    assert channel.after.size_bytes - layer.after.size_bytes >= 58 * 16 * 4 - 3 * 16 * 4  # the codebooks' cost
    session = ort.InferenceSession(results["channel"].model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, {"image": data["image"][0]})[0]).all()


def test_codebook_must_be_layer_or_channel() -> None:
    with pytest.raises(PlanError, match="codebook"):
        parse_plan({"steps": [{"kind": "cluster", "codebook": "row"}]})
