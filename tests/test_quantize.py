"""QuantizePass: structure, numerics in ONNX Runtime, the x86 defaults, prechecks, and real accuracy on digits."""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnx_ops.errors import PassFailedError, PlanError
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.quantize import QuantizePass
from onnx_ops.passes.quantize import ort as ort_calls
from onnx_ops.passes.quantize import selection as selection_module
from onnx_ops.passes.quantize import storage as storage_module
from onnx_ops.plan import QuantizeStep
from onnx_ops.report import LatencyComparison
from tests import models
from tests.digits import digits
from tests.helpers import assert_outputs_close, random_feeds, run, scripted_comparison


def _quantize(
    proto: onnx.ModelProto, workdir: Path, calibration: list[dict[str, np.ndarray]] | None = None, **step: object
) -> tuple[onnx.ModelProto, QuantizePass]:
    workdir.mkdir(exist_ok=True)
    qpass = QuantizePass(QuantizeStep(**step), PassContext(workdir=workdir, calibration=calibration))
    model = ir.from_proto(proto)
    qpass.precheck(model)
    result = qpass(model)
    assert result.model is model  # quantized in place
    return ir.to_proto(result.model), qpass


def _ops(proto: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in proto.graph.node)


def _calibration(proto: onnx.ModelProto, n: int = 16) -> list[dict[str, np.ndarray]]:
    return [random_feeds(proto, batch=1, seed=100 + i) for i in range(n)]


def _float_weights(proto: onnx.ModelProto) -> set[str]:
    return {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}


def test_dynamic_mlp_uses_integer_matmul_and_stays_close(tmp_path):
    proto = models.mlp()
    out, qpass = _quantize(proto, tmp_path)
    ops = _ops(out)
    assert ops["MatMulInteger"] == 3 and ops["DynamicQuantizeLinear"] == 3 and ops["MatMul"] == 0
    # int8 weights and per-batch uint8 activations through 3 layers: the max error measured 1.5-1.9% of the
    # largest logit (about 0.09 of 5) on 5 seeds of 32 random samples; 5% leaves room for other CPUs' kernels.
    feeds = random_feeds(proto, batch=32)
    want = run(proto, feeds)[0]
    assert_outputs_close(out, proto, atol=0.05 * float(np.abs(want).max()), feeds=feeds)
    assert len(out.SerializeToString()) < 0.35 * len(proto.SerializeToString())  # measured 0.29
    assert [(c.name, c.weight, c.note) for c in qpass.log.layers] == [
        ("fc0", "W0", "int8 per-channel"), ("fc1", "W1", "int8 per-channel"), ("fc2", "W2", "int8 per-channel")
    ]  # fmt: skip
    assert qpass.log.summary["quantized_nodes"] == ["MatMul: 3"]
    assert str(qpass.log.summary["quantizer"]).startswith("own")  # no preprocessing needed for that
    assert qpass.log.summary["preprocess"] == "not needed: the pass quantizes MatMul and Gather itself"


def test_dynamic_leaves_constant_weight_conv_in_float_by_default(tmp_path):
    proto = models.conv_net()  # opset 11, weights in Constant nodes
    out, qpass = _quantize(proto, tmp_path, float_layer_weights="float")
    ops = _ops(out)
    assert ops["Conv"] == 2 and ops["ConvInteger"] == 0 and ops["MatMulInteger"] == 1  # the Gemm head
    assert [s.name for s in qpass.log.skipped] == ["Conv x2"]
    assert "ConvInteger is slower" in qpass.log.skipped[0].reason
    assert any("Conv" in w for w in qpass.log.warnings)
    assert qpass.log.summary["conv_left_in_float"] == 2
    assert_outputs_close(out, proto, atol=0.1)  # measured 0.017 (logits up to about 1.4)


def test_dynamic_conv_when_asked_warns_slow(tmp_path):
    out, qpass = _quantize(models.conv_net(), tmp_path, op_types=["Conv", "Gemm"])
    assert _ops(out)["ConvInteger"] == 2
    assert any("documents ConvInteger as slow" in w for w in qpass.log.warnings)
    run(out, random_feeds(out))


def test_dynamic_quantizes_lstm(tmp_path):
    proto = models.lstm()
    out, qpass = _quantize(proto, tmp_path)
    assert _ops(out)["DynamicQuantizeLSTM"] == 1
    assert {c.weight for c in qpass.log.layers} == {"W", "R", "head"}
    assert_outputs_close(out, proto, atol=0.05, feeds=random_feeds(proto, dims={"T": 5, "N": 3}))  # measured 0.013


def test_static_qdq_per_channel_upgrades_old_opset_and_loads(tmp_path):
    proto = models.conv_net()  # opset 11: per-channel QDQ below 13 is refused by ONNX Runtime
    out, qpass = _quantize(proto, tmp_path, _calibration(proto), mode="static", per_channel=True)
    assert out.opset_import[0].version == 13
    assert qpass.log.summary["opset"] == "upgraded 11 -> 13"
    assert _ops(out)["QuantizeLinear"] > 0 and _ops(out)["DequantizeLinear"] > 0
    # Preprocessing folded BatchNormalization into Conv and renamed the weights; the report keeps the originals.
    assert [(c.name, c.weight, c.note) for c in qpass.log.layers] == [
        ("conv0", "conv0.W", "int8 per-channel"), ("conv1", "conv1.W", "int8 per-channel"),
        ("fc", "fc.W", "int8 per-channel"),
    ]  # fmt: skip
    ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_outputs_close(out, proto, atol=0.1)  # measured 0.023


def test_static_qoperator_emits_qlinear_ops(tmp_path):
    proto = models.conv_net(constant_weights=False, opset=13)
    out, qpass = _quantize(proto, tmp_path, _calibration(proto), mode="static", format="qoperator")
    assert _ops(out)["QLinearConv"] == 2
    assert qpass.log.summary["opset"] == "13 (unchanged)" and not qpass.log.warnings
    assert_outputs_close(out, proto, atol=0.1)  # measured 0.023


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "distribution"])
def test_each_calibration_method_runs(tmp_path, method, capsys):
    proto = models.mlp(sizes=(16, 16, 4))
    calibration = _calibration(proto, 12)
    out, qpass = _quantize(
        proto, tmp_path, calibration, mode="static", calibration_method=method, calibration_samples=8
    )
    assert _ops(out)["QuantizeLinear"] > 0
    assert qpass.log.summary["calibration_method"] == method
    assert qpass.log.summary["calibration_samples"] == 8
    run(out, calibration[0])
    assert capsys.readouterr().out == ""  # ORT's calibrator progress prints are kept off stdout


def test_static_without_calibration_is_a_plan_error(tmp_path):
    qpass = QuantizePass(QuantizeStep(mode="static"), PassContext(workdir=tmp_path))
    with pytest.raises(PlanError, match="static quantization needs calibration data"):
        qpass.precheck(ir.from_proto(models.mlp()))


def test_calibration_with_wrong_input_name_is_a_plan_error(tmp_path):
    calibration = [{"wrong": np.zeros((1, 64), np.float32)}]
    qpass = QuantizePass(QuantizeStep(mode="static"), PassContext(workdir=tmp_path, calibration=calibration))
    with pytest.raises(PlanError, match=r"missing \['x'\], unknown \['wrong'\]"):
        qpass.precheck(ir.from_proto(models.mlp()))


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"exclude_op_types": ["MatMul", "Gemm"]}, "no node is left to quantize"),
        ({"op_types": ["Conv"]}, "no node is left to quantize"),
        ({"op_types": ["Softmax"]}, "cannot quantize in dynamic mode: Softmax"),
        ({"exclude_nodes": ["nope"]}, "exclude_nodes names nodes the model does not have: nope"),
        ({"activation_type": "int8", "weight_type": "uint8", "mode": "static"}, "int8 activations with uint8"),
    ],
)
def test_precheck_refuses_impossible_steps(tmp_path, step, message):
    proto = models.mlp()
    qpass = QuantizePass(QuantizeStep(**step), PassContext(workdir=tmp_path, calibration=_calibration(proto, 2)))
    with pytest.raises(PlanError, match=message):
        qpass.precheck(ir.from_proto(proto))


def test_already_quantized_model_is_a_plan_error(tmp_path):
    quantized, _ = _quantize(models.mlp(), tmp_path / "first")
    qpass = QuantizePass(QuantizeStep(), PassContext(workdir=tmp_path))
    with pytest.raises(PlanError, match="already quantized .*DynamicQuantizeLinear, MatMulInteger"):
        qpass.precheck(ir.from_proto(quantized))


def test_dynamic_exclude_nodes_keeps_gemm_in_float(tmp_path):
    # ORT rewrites Gemm into "<name>_MatMul" before quantizing, so excluding by the Gemm's name alone fails.
    out, qpass = _quantize(models.mlp(gemm=True), tmp_path, exclude_nodes=["fc1"])
    assert _ops(out)["MatMulInteger"] == 2 and _ops(out)["MatMul"] == 1
    assert "W1_Transposed" in _float_weights(out)  # the rewrite transposed it, but left it in float
    assert [c.name for c in qpass.log.layers] == ["fc0", "fc2"]
    assert [(s.name, s.reason) for s in qpass.log.skipped] == [("Gemm x1", "excluded by exclude_nodes")]


def test_static_exclude_nodes_survive_preprocessing_renames(tmp_path):
    # Preprocessing fuses MatMul fc1 + Add into Gemm "fc1/MatMulAddFusion"; the exclusion must follow it.
    proto = models.mlp()
    out, qpass = _quantize(proto, tmp_path, _calibration(proto), mode="static", exclude_nodes=["fc1"])
    assert "W1" in _float_weights(out) and not {"W0", "W2"} & _float_weights(out)
    assert [c.name for c in qpass.log.layers] == ["fc0", "fc2"]


def test_static_exclude_op_types(tmp_path):
    proto = models.conv_net()
    out, qpass = _quantize(proto, tmp_path, _calibration(proto), mode="static", exclude_op_types=["Gemm"])
    assert "fc.W" in _float_weights(out)
    assert {c.name for c in qpass.log.layers} == {"conv0", "conv1"}
    assert [(s.name, s.reason) for s in qpass.log.skipped] == [("Gemm x1", "excluded by exclude_op_types")]


@pytest.mark.parametrize(
    ("step", "warning"),
    [
        ({"activation_type": "int8", "format": "qoperator"}, "documented slow on x86"),
        ({"activation_type": "int8"}, "slower than uint8"),
    ],
)
def test_static_int8_activations_warn(tmp_path, step, warning):
    proto = models.mlp(sizes=(16, 16, 4))
    _, qpass = _quantize(proto, tmp_path, _calibration(proto, 4), mode="static", **step)
    assert any(warning in w for w in qpass.log.warnings)


def test_preprocess_auto_falls_back_and_on_fails(tmp_path, monkeypatch):
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"shape inference exploded in {tmp_path}/q/x.onnx")

    monkeypatch.setattr(ort_calls.ortq, "quant_pre_process", broken)
    out, qpass = _quantize(models.conv_net(), tmp_path / "q")  # its Gemm goes through ONNX Runtime's quantizer
    assert _ops(out)["MatMulInteger"] == 1
    assert qpass.log.summary["preprocess"] == "failed, skipped"
    assert any("shape inference exploded" in w and str(tmp_path) not in w for w in qpass.log.warnings)
    with pytest.raises(PassFailedError, match="quant_pre_process") as info:
        _quantize(models.mlp(), tmp_path / "q", preprocess="on")  # 'on' takes ONNX Runtime's path
    assert str(tmp_path) not in info.value.message


def test_ort_failure_is_pass_failed_without_paths(tmp_path, monkeypatch):
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError(f"cannot read {tmp_path}/q/quantize_input.onnx: bad things")

    monkeypatch.setattr(ort_calls.ortq, "quantize_static", broken)
    proto = models.mlp()
    with pytest.raises(PassFailedError, match=r"^quantize \(static, qdq\) failed: cannot read") as info:
        _quantize(proto, tmp_path / "q", _calibration(proto, 2), mode="static")
    assert str(tmp_path) not in info.value.message and "bad things" in info.value.message


def test_failed_opset_upgrade_is_pass_failed(tmp_path, monkeypatch):
    def broken(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError("no adapter for BatchNormalization")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    proto = models.conv_net()
    with pytest.raises(PassFailedError, match="needs opset 13; upgrading failed: no adapter"):
        _quantize(proto, tmp_path, _calibration(proto, 2), mode="static")


def test_result_is_the_given_model_with_every_weight_in_memory(tmp_path):
    proto = models.conv_net()
    model = ir.from_proto(proto)
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = QuantizePass(QuantizeStep(), PassContext(workdir=workdir))(model)
    shutil.rmtree(workdir)
    assert result.model is model
    out = ir.to_proto(result.model)
    assert all(not onnx.external_data_helper.uses_external_data(i) for i in out.graph.initializer)
    run(out, random_feeds(out))


def test_digits_static_int8_keeps_accuracy(tmp_path):
    data = digits()
    assert data.sklearn_accuracy > 0.9
    out, qpass = _quantize(
        data.model, tmp_path, data.feeds(data.x_train), mode="static", calibration_samples=150
    )  # fmt: skip
    assert qpass.log.summary["calibration_samples"] == 150
    assert qpass.log.summary["quantized_nodes"] == ["MatMul: 3"]

    def accuracy(model: onnx.ModelProto) -> float:
        labels = run(model, {model.graph.input[0].name: data.x_test})[0]
        return float(np.mean(labels == data.y_test))

    before, after = accuracy(data.model), accuracy(out)
    assert before > 0.9  # measured 0.973 on 450 held-out images
    assert before - after <= 0.01, f"accuracy {before:.4f} -> {after:.4f}"  # measured no drop
    assert len(out.SerializeToString()) < 0.5 * len(data.model.SerializeToString())  # measured 0.35


def _depthwise_net(seed: int = 0) -> onnx.ModelProto:
    """x[1,4,8,8] -> depthwise Conv (group 4) -> pointwise Conv -> global pool -> Gemm head, opset 17."""
    rng = np.random.default_rng(seed)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "dw.W"),
        onnx.numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype(np.float32), "pw.W"),
        onnx.numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "fc.W"),
        onnx.numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"),
    ]
    nodes = [
        onnx.helper.make_node("Conv", ["x", "dw.W"], ["h0"], name="dw", group=4, pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["h0"], ["h1"], name="relu0"),
        onnx.helper.make_node("Conv", ["h1", "pw.W"], ["h2"], name="pw"),
        onnx.helper.make_node("GlobalAveragePool", ["h2"], ["h3"], name="pool"),
        onnx.helper.make_node("Flatten", ["h3"], ["h4"], name="flat"),
        onnx.helper.make_node("Gemm", ["h4", "fc.W", "fc.b"], ["y"], name="fc"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "depthwise_net",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _scripted_speed(monkeypatch: pytest.MonkeyPatch, ratios: list[float], spread: float = 0.02) -> list[str]:
    """Replace the timer (not ONNX Runtime) by scripted int8/float ratios; returns the quantized ops timed."""
    timed: list[str] = []
    script = iter(ratios)

    def ratio(baseline: object, quantized: ir.Model, feed: object, workdir: object) -> LatencyComparison:
        timed.append(",".join(sorted({node.op_type for node in quantized.graph})))
        return scripted_comparison(next(script), spread)

    monkeypatch.setattr(selection_module, "_MIN_CHECKED_MS", 0.0)
    monkeypatch.setattr(selection_module, "_speed_ratio", ratio)
    return timed


def _int8_weights(proto: onnx.ModelProto) -> set[str]:
    int8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    names = {i.name for i in proto.graph.initializer if i.data_type in int8 and i.name.endswith("_quantized")}
    return {name.removesuffix("_quantized") for name in names}


def test_per_channel_is_the_default_and_false_still_means_per_tensor(tmp_path):
    proto = models.mlp()
    _, default = _quantize(proto, tmp_path / "a", speed_check=False)
    _, tensor = _quantize(proto, tmp_path / "b", per_channel=False, speed_check=False)
    assert {c.note for c in default.log.layers} == {"int8 per-channel"} and default.log.summary["per_channel"] is True
    assert {c.note for c in tensor.log.layers} == {"int8 per-tensor"} and tensor.log.summary["per_channel"] is False


def test_dynamic_per_channel_falls_back_to_per_tensor_when_opset_cannot_be_raised(tmp_path, monkeypatch):
    def broken(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError("no adapter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    _, qpass = _quantize(models.conv_net(), tmp_path, speed_check=False, float_layer_weights="float")  # opset 11
    assert [c.note for c in qpass.log.layers] == ["int8 per-tensor"]
    assert qpass.log.summary["per_channel"] is False
    assert any("per tensor" in w for w in qpass.log.warnings)


def test_slower_int8_falls_back_to_no_depthwise_conv(tmp_path, monkeypatch):
    proto = _depthwise_net()
    timed = _scripted_speed(monkeypatch, [1.5, 0.8])
    out, qpass = _quantize(proto, tmp_path, _calibration(proto), mode="static")
    assert len(timed) == 2
    assert _int8_weights(out) == {"pw.W", "fc.W"} and "dw.W" in _float_weights(out)
    assert qpass.log.summary["speed_check"].startswith("fell back to without 1 depthwise Conv")
    assert any(s.name == "Conv x1" and "slower than float" in s.reason for s in qpass.log.skipped)
    assert_outputs_close(out, proto, atol=0.5)  # int8 on random weights; it must still compute the same thing


def test_slower_int8_falls_back_to_matmul_gemm_only(tmp_path, monkeypatch):
    proto = _depthwise_net()
    _scripted_speed(monkeypatch, [1.5, 1.2, 0.9])
    out, qpass = _quantize(proto, tmp_path, _calibration(proto), mode="static")
    assert _int8_weights(out) == {"fc.W"} and {"dw.W", "pw.W"} <= _float_weights(out)
    assert "MatMul/Gemm only" in str(qpass.log.summary["speed_check"])
    assert any("quantized MatMul/Gemm only" in w for w in qpass.log.warnings)


def test_int8_slower_in_every_variant_keeps_float(tmp_path, monkeypatch):
    proto = _depthwise_net()
    _scripted_speed(monkeypatch, [1.5, 1.2, 1.15])
    workdir = tmp_path / "w"
    workdir.mkdir()
    qpass = QuantizePass(QuantizeStep(mode="static"), PassContext(workdir=workdir, calibration=_calibration(proto)))
    result = qpass(ir.from_proto(proto))
    out = ir.to_proto(result.model)
    assert not result.modified and not _int8_weights(out) and not qpass.log.layers
    assert "QuantizeLinear" not in _ops(out)
    assert str(qpass.log.summary["speed_check"]).startswith("kept float")
    assert any("left in float" in w for w in qpass.log.warnings)
    assert_outputs_close(out, proto, atol=1e-5)


@pytest.mark.parametrize(("ratio", "spread"), [(1.03, 0.02), (1.3, 0.4)])
def test_int8_within_timing_noise_of_float_is_kept(tmp_path, monkeypatch, ratio, spread):
    # 1.03 is under the smallest reported change; 1.3 with an interval of 0.78-1.82 cannot be told from 1.
    proto = _depthwise_net()
    timed = _scripted_speed(monkeypatch, [ratio], spread)
    out, qpass = _quantize(proto, tmp_path, _calibration(proto), mode="static")
    assert len(timed) == 1 and _int8_weights(out) == {"dw.W", "pw.W", "fc.W"}
    summary = str(qpass.log.summary["speed_check"])
    assert summary.startswith("int8/float CPU time") and "no measurable change" in summary
    assert not any("slower" in w for w in qpass.log.warnings)


def test_speed_check_off_or_explicit_op_types_keep_ort_result(tmp_path, monkeypatch):
    proto = _depthwise_net()
    timed = _scripted_speed(monkeypatch, [])  # any timing would raise StopIteration
    off, _ = _quantize(proto, tmp_path / "a", _calibration(proto), mode="static", speed_check=False)
    named, _ = _quantize(proto, tmp_path / "b", _calibration(proto), mode="static", op_types=["Conv", "Gemm"])
    assert not timed and _int8_weights(off) == _int8_weights(named) == {"dw.W", "pw.W", "fc.W"}


def test_speed_check_times_real_models_and_skips_tiny_ones(tmp_path, monkeypatch):
    proto = models.mlp()
    _, tiny = _quantize(proto, tmp_path / "a")
    assert str(tiny.log.summary["speed_check"]).startswith("skipped: the float model runs in")
    monkeypatch.setattr(selection_module, "_MIN_CHECKED_MS", 0.0)
    out, timed = _quantize(proto, tmp_path / "b")
    # Which branch is taken depends on this CPU; each must leave a valid model that computes the same thing.
    assert str(timed.log.summary["speed_check"]).startswith(("int8/float CPU time", "fell back to", "kept float"))
    feeds = random_feeds(proto, batch=8)
    assert_outputs_close(out, proto, atol=0.05 * float(np.abs(run(proto, feeds)[0]).max()), feeds=feeds)


def _embedding_net(vocab: int = 64, dim: int = 32, seed: int = 0) -> onnx.ModelProto:
    """ids[1,8] -> Gather(table[vocab,dim]) -> MatMul(W[dim,16]): a tiny embedding + projection, opset 21."""
    rng = np.random.default_rng(seed)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "table"),
        onnx.numpy_helper.from_array(rng.standard_normal((dim, 16)).astype(np.float32), "proj.W"),
    ]
    nodes = [
        onnx.helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        onnx.helper.make_node("MatMul", ["emb", "proj.W"], ["y"], name="proj"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "embedding_net",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 16])],
        inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_embedding_bits_4_puts_the_table_in_4_bit_blocks_and_keeps_matmul_8_bit(tmp_path):
    proto = _embedding_net()
    eight, _ = _quantize(proto, tmp_path / "a", speed_check=False)
    four, qpass = _quantize(proto, tmp_path / "b", embedding_bits=4, speed_check=False)
    assert "GatherBlockQuantized" in _ops(four) and "Gather" not in _ops(four)
    assert "proj.W" in _int8_weights(four) and "table" in _int8_weights(eight)
    assert ("embed", "Gather", "table", "int4 blocks of 32 (weight-only)") in [
        (c.name, c.op_type, c.weight, c.note) for c in qpass.log.layers
    ]
    assert qpass.log.summary["embeddings_4bit"] == 1
    assert len(four.SerializeToString()) < len(eight.SerializeToString())
    feeds = {"ids": np.arange(8, dtype=np.int64)[None] * 7 % 64}
    want, got = run(proto, feeds)[0].ravel(), run(four, feeds)[0].ravel()
    # 4-bit symmetric blocks of 32 on N(0, 1) weights, then int8: measured cosine 0.995 (max error 12% of the peak).
    assert float(want @ got / np.linalg.norm(want) / np.linalg.norm(got)) > 0.97


def test_a_model_with_4_bit_embeddings_counts_as_quantized(tmp_path):
    four, _ = _quantize(_embedding_net(), tmp_path / "a", embedding_bits=4, speed_check=False)
    with pytest.raises(PlanError, match="already quantized"):
        _quantize(four, tmp_path / "b")


def test_onnxruntime_quantizer_warnings_are_counted_not_shown(tmp_path, caplog):
    data = digits()  # skl2onnx's label path has int64 tensors the quantizer warns about
    with caplog.at_level("DEBUG"), caplog.at_level("DEBUG", logger="onnx_ops"):  # a CLI run may have set it
        _, qpass = _quantize(data.model, tmp_path, data.feeds(data.x_train[:32]), mode="static")
    assert qpass.log.summary["onnxruntime_log_messages"] > 0
    shown = [r for r in caplog.records if r.levelname == "WARNING" and "Inference failed" in r.getMessage()]
    assert shown == []
    assert any("onnxruntime.quantization said" in r.getMessage() for r in caplog.records)  # at debug level


def _power_net(seed: int = 0) -> onnx.ModelProto:
    """x[1,64] -> MatMul -> y*y -> Sqrt -> MatMul -> Tanh: a spectrum-magnitude front end with a bounded output."""
    rng = np.random.default_rng(seed)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "proj.W"),
        onnx.numpy_helper.from_array((0.05 * rng.standard_normal((64, 8))).astype(np.float32), "head.W"),
    ]
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "proj.W"], ["y"], name="proj"),
        onnx.helper.make_node("Mul", ["y", "y"], ["power"], name="power"),
        onnx.helper.make_node("Sqrt", ["power"], ["magnitude"], name="magnitude"),
        onnx.helper.make_node("MatMul", ["magnitude", "head.W"], ["logits"], name="head"),
        onnx.helper.make_node("Tanh", ["logits"], ["out"], name="squash"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "power_net",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 8])],
        inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _loud_and_quiet(loudness: float) -> list[dict[str, np.ndarray]]:
    """One loud sample, which sets every activation range, and seven quiet ones (as speech and silence do)."""
    rng = np.random.default_rng(1)
    return [{"x": (rng.standard_normal((1, 64)) * (loudness if i == 0 else 0.3)).astype(np.float32)} for i in range(8)]


def _worst_cosine(proto: onnx.ModelProto, out: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    ref = np.concatenate([run(proto, f)[0].ravel() for f in feeds]).astype(np.float64)
    got = np.concatenate([run(out, f)[0].ravel() for f in feeds]).astype(np.float64)
    return float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got) + 1e-30))


def test_static_far_off_outputs_fall_back_to_weight_layers_only(tmp_path):
    # Measured: all types 0.52 (the squared activations lose the quiet samples), weight layers only 0.97.
    proto, feeds = _power_net(), _loud_and_quiet(3.0 / 0.3)
    explicit, _ = _quantize(proto, tmp_path / "a", feeds, mode="static", op_types=["MatMul", "Mul"], speed_check=False)
    assert _worst_cosine(proto, explicit, feeds) < 0.9  # named op types: the user's choice, kept
    out, qpass = _quantize(proto, tmp_path / "b", feeds, mode="static", speed_check=False)
    assert _worst_cosine(proto, out, feeds) >= 0.9
    assert _int8_weights(out) == {"proj.W", "head.W"}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "power" for n in out.graph.node)
    assert "weight layers only" in str(qpass.log.summary["fidelity_check"])
    assert any("changed the outputs too much" in w and "quantized weight layers only" in w for w in qpass.log.warnings)


def test_static_far_off_in_every_variant_keeps_float(tmp_path):
    proto, feeds = _power_net(), _loud_and_quiet(100.0)  # measured: 0.52, then 0.79 with weight layers only
    workdir = tmp_path / "w"
    workdir.mkdir()
    step = QuantizeStep(mode="static", float_layer_weights="float")
    qpass = QuantizePass(step, PassContext(workdir=workdir, calibration=feeds))
    result = qpass(ir.from_proto(proto))
    out = ir.to_proto(result.model)
    assert not result.modified and not _int8_weights(out) and "QuantizeLinear" not in _ops(out)
    assert any("changed the outputs too much" in w and "left in float" in w for w in qpass.log.warnings)
    assert any("changed the outputs too much" in s.reason for s in qpass.log.skipped)
    assert_outputs_close(out, proto, atol=1e-5)
    # By default the weights of the layers left in float are stored int8; the activations stay float.
    qpass = QuantizePass(QuantizeStep(mode="static"), PassContext(workdir=workdir, calibration=feeds))
    result = qpass(ir.from_proto(proto))
    out = ir.to_proto(result.model)
    assert result.modified and "QuantizeLinear" not in _ops(out) and _worst_cosine(proto, out, feeds) >= 0.99
    assert all("int8 storage" in c.note and "changed the outputs too much" in c.note for c in qpass.log.layers)


def test_dynamic_stores_the_weights_of_conv_left_in_float_as_int8_that_ort_folds_back(tmp_path):
    proto = models.conv_net()  # opset 11, weights in Constant nodes
    out, qpass = _quantize(proto, tmp_path / "a")
    plain, _ = _quantize(proto, tmp_path / "b", float_layer_weights="float")
    ops = _ops(out)
    assert ops["Conv"] == 2 and ops["ConvInteger"] == 0 and ops["Cast"] >= 2 and ops["MatMulInteger"] == 1
    stored = [c for c in qpass.log.layers if c.op_type == "Conv"]
    assert len(stored) == 2 and not qpass.log.skipped
    assert all(c.note.startswith("int8 storage, float compute (dynamic mode leaves Conv") for c in stored)
    assert all(c.rel_error is not None and c.rel_error < 0.01 for c in stored)
    assert qpass.log.summary["int8_storage"] == "2 weights of layers left in float"
    assert qpass.log.summary["quantized_weights"] == 1  # the Gemm head: the Convs compute in float
    stored_int8 = [i.name for i in out.graph.initializer if i.name.endswith("_int8")]
    assert len(stored_int8) == 2 and all(i.data_type == onnx.TensorProto.INT8 for i in out.graph.initializer
                                         if i.name.endswith("_int8"))  # fmt: skip
    assert len(out.SerializeToString()) < 0.5 * len(plain.SerializeToString())
    assert_outputs_close(out, proto, atol=0.1)
    # ONNX Runtime folds each Cast and Mul into a float weight when it loads the model.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert not [n.op_type for n in optimized.graph.node if any(name.endswith("_int8") for name in n.input)]


def test_int8_storage_scales_each_output_channel_on_the_right_axis(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    # Output channels whose sizes differ by 1000x: one scale per tensor would flatten the small ones to zero.
    spread = np.logspace(-3, 0, 32).astype(np.float32)
    weights = {
        "conv_w": rng.standard_normal((32, 4, 3, 3)).astype(np.float32) * spread[:, None, None, None],
        "gemm_t_w": rng.standard_normal((32, 64)).astype(np.float32) * spread[:, None],  # transB=1: [N, K]
        "gemm_w": rng.standard_normal((32, 32)).astype(np.float32) * spread[None, :],  # [K, N]
        "matmul_w": rng.standard_normal((32, 32)).astype(np.float32) * spread[None, :],
    }
    nodes = [
        helper.make_node("Conv", ["img", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c"], ["pooled"], name="pool", axes=[2, 3], keepdims=0),
        helper.make_node("Gemm", ["x", "gemm_t_w"], ["g1"], name="gemm_t", transB=1),
        helper.make_node("Gemm", ["g1", "gemm_w"], ["g2"], name="gemm"),
        helper.make_node("MatMul", ["g2", "matmul_w"], ["m"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "axes",
        [
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 8, 8]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
        ],
        [
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 32]),
            helper.make_tensor_value_info("m", TensorProto.FLOAT, [2, 32]),
        ],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.from_proto(proto)
    changes = storage_module._store_int8(model, {n.name: "test" for n in nodes})
    assert sorted(c.weight for c in changes) == sorted(weights)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    restored = {c.weight: c for c in changes}
    assert all(c.rel_error < 0.01 for c in restored.values()), [(c.weight, c.rel_error) for c in changes]
    feed = {"img": rng.standard_normal((1, 4, 8, 8)).astype(np.float32), "x": rng.standard_normal((2, 64))}
    feed["x"] = feed["x"].astype(np.float32)
    for want, got in zip(run(proto, feed), run(out, feed), strict=True):
        # Every output channel keeps its own precision, the smallest ones included.
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).min(axis=0).mean())


def test_int8_storage_follows_op_types_unless_asked_for(tmp_path):
    proto = models.conv_net()
    # Explicit op_types: auto stores nothing beyond them; int8 stores every layer left in float, excluded ones too.
    out, auto = _quantize(proto, tmp_path / "a", op_types=["Gemm"])
    assert "int8_storage" not in auto.log.summary and not [i for i in out.graph.initializer if "_int8" in i.name]
    out, asked = _quantize(proto, tmp_path / "b", op_types=["Gemm"], float_layer_weights="int8")
    assert asked.log.summary["int8_storage"] == "2 weights of layers left in float"
    assert {c.note for c in asked.log.layers if c.op_type == "Conv"} == {
        "int8 storage, float compute (not in op_types)"
    }
    assert_outputs_close(out, proto, atol=0.1)
    # Left to the pass, a layer the user excluded keeps its float weight unless int8 is asked for.
    conv = next(n.name for n in proto.graph.node if n.op_type == "Conv")
    _, default = _quantize(proto, tmp_path / "c", exclude_nodes=[conv])
    assert default.log.summary["int8_storage"] == "1 weights of layers left in float"
    _, forced = _quantize(proto, tmp_path / "d", exclude_nodes=[conv], float_layer_weights="int8")
    assert forced.log.summary["int8_storage"] == "2 weights of layers left in float"


def test_int8_storage_of_recurrent_weights_is_folded_back_by_ort(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden, size = 32, 24
    w = (rng.standard_normal((1, 4 * hidden, size)) * 0.2).astype(np.float32)
    r = (rng.standard_normal((1, 4 * hidden, hidden)) * 0.2).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm", hidden_size=hidden)],
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10, 2, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10, 1, 2, hidden])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.from_proto(proto)
    changes = storage_module._store_int8(model, {"lstm": "test"})
    assert [c.weight for c in changes] == ["W", "R"] and all(c.rel_error < 0.01 for c in changes)
    out = ir.to_proto(model)
    assert storage_module._unfolded(model, {"W", "R"}, tmp_path) == ""
    feed = {"x": rng.standard_normal((10, 2, size)).astype(np.float32)}
    np.testing.assert_allclose(run(out, feed)[0], run(proto, feed)[0], atol=0.02)


def test_dynamic_on_a_model_with_only_conv_stores_its_weights_int8_instead_of_refusing(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, qpass = _quantize(proto, tmp_path / "a")  # dynamic leaves Conv in float: only its storage changes
    assert [(c.op_type, c.note.split(" (")[0]) for c in qpass.log.layers] == [("Conv", "int8 storage, float compute")]
    assert _ops(out)["Conv"] == 1 and len(out.SerializeToString()) < 0.3 * len(proto.SerializeToString())
    assert_outputs_close(out, proto, atol=0.05)
    with pytest.raises(PlanError, match="no node is left to quantize"):  # nothing to do without the storage
        QuantizePass(QuantizeStep(float_layer_weights="float"), PassContext(workdir=tmp_path)).precheck(
            ir.from_proto(proto)
        )
