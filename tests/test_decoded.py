"""A clustered model's decoders folded by NumPy hold the weights ONNX Runtime's own folding computes."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnx_ops import compress
from onnx_ops.decoded import folded_file, session_file

import models

FAST = {"latency_runs": 3, "latency_seconds": 0.0, "warmup_runs": 1}


def _ort_folded(path: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "ort_folded.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(tmp_path / "ort_folded.onnx")
    return {i.name: onnx.numpy_helper.to_array(i) for i in folded.graph.initializer}


@pytest.mark.parametrize(
    "step", [{"bits": 3}, {"bits": 8}, {"bits": 6, "codebook": "channel"}, {"bits": 4, "op_types": ["Gather"]}]
)
def test_numpy_folding_gives_onnxruntimes_weights_and_outputs(step: dict[str, Any], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    if step.get("op_types"):
        source, feed = models.tiny_encoder(), {"input_ids": rng.integers(0, 512, (2, 16))}
    else:
        source, feed = models.mlp((64, 256, 256, 16)), {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    plan = {"steps": [{"kind": "cluster", "min_elements": 1024, **step}], "evaluation": FAST}
    result = compress(source, plan, evaluation={name: array[None] for name, array in feed.items()})
    path = tmp_path / "clustered.onnx"
    ir.save(ir.from_proto(result.model), path, external_data="clustered.onnx.data", size_threshold_bytes=1024)
    folded = folded_file(path, tmp_path / "folded.onnx")
    assert folded is not None
    mine = onnx.load(folded)
    assert not any(node.op_type in ("BitShift", "Cast") for node in mine.graph.node)
    theirs = _ort_folded(path, tmp_path)
    for tensor in mine.graph.initializer:
        if tensor.name.endswith("_clustered"):
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor, str(tmp_path)), theirs[tensor.name])
    a = ort.InferenceSession(str(folded), providers=["CPUExecutionProvider"]).run(None, feed)
    b = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # The measure phase uses it only after a cluster step whose decoders ONNX Runtime folds.
    assert session_file(path, result.report.steps) == path.with_name("clustered_folded.onnx")
    unfolded = result.report.steps[0].model_copy(update={"summary": {"folded_at_load": False}})
    assert session_file(path, [unfolded]) == path


def test_a_model_without_decoders_is_measured_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(), path)
    assert folded_file(path, tmp_path / "folded.onnx") is None


def test_the_folded_model_is_freed_when_the_file_is_written(tmp_path: Path) -> None:
    # Its IR is held in reference cycles: left to the collector, the float weights it decoded would stay in
    # memory beside the two sessions of the measure phase (one copy of the weights more).
    plan = {"steps": [{"kind": "cluster", "min_elements": 1024, "bits": 4}], "evaluation": FAST}
    result = compress(models.mlp((64, 256, 256, 16)), plan)
    path = tmp_path / "clustered.onnx"
    ir.save(ir.from_proto(result.model), path, external_data="clustered.onnx.data", size_threshold_bytes=1024)
    del result
    gc.collect()
    gc.disable()  # whether the collector would have run by chance must not decide the outcome
    try:
        before = sum(isinstance(o, ir.Graph) for o in gc.get_objects())
        assert folded_file(path, tmp_path / "folded.onnx") is not None
        after = sum(isinstance(o, ir.Graph) for o in gc.get_objects())
    finally:
        gc.enable()
    assert after == before
