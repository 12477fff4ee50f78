"""DataWriter on tensors held in typed fields (``int32_data``...): written as raw_data holds them, sub-byte packed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor

from onnx_ops import job_files, job_model
from onnx_ops.errors import InvalidModelError
from onnx_ops.validate import Limits

SHAPE = (17, 241)  # an odd count of elements: the last packed byte is half (quarter) used; INT2 still past 1 KiB
TYPED = [
    TensorProto.INT4,
    TensorProto.UINT4,
    TensorProto.FLOAT4E2M1,
    TensorProto.INT2,
    TensorProto.UINT2,
    TensorProto.FLOAT6E2M3,
    TensorProto.FLOAT6E3M2,
    TensorProto.FLOAT16,
    TensorProto.BFLOAT16,
    TensorProto.FLOAT8E4M3FN,
    TensorProto.BOOL,
    TensorProto.INT8,
    TensorProto.UINT16,
    TensorProto.UINT32,
    TensorProto.COMPLEX64,
    TensorProto.FLOAT,
]


def _values(data_type: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Small whole numbers (zeros among them; negative where the type has them) as an array of that ONNX type."""
    rng = np.random.default_rng(seed)
    name = TensorProto.DataType.Name(data_type)
    low = -2 if name in ("INT4", "INT2", "INT8") or "FLOAT" in name else 0
    return rng.integers(low, 2, shape).astype(np.float32).astype(helper.tensor_dtype_to_np_dtype(data_type))


def _typed(name: str, values: np.ndarray, data_type: int) -> TensorProto:
    tensor = helper.make_tensor(name, data_type, values.shape, values, raw=False)
    assert not tensor.HasField("raw_data")
    return tensor


@pytest.mark.parametrize("data_type", TYPED, ids=TensorProto.DataType.Name)
def test_typed_fields_are_written_as_raw_data_holds_them(tmp_path: Path, data_type: int) -> None:
    values = _values(data_type, SHAPE)
    tensor = _typed("w", values, data_type)
    raw = helper.make_tensor("w", data_type, SHAPE, values, raw=True).raw_data  # onnx's own raw form
    writer = job_files.DataWriter(tmp_path / "w.data")
    try:
        assert writer.add_inline(tensor)
    finally:
        writer.close()
    info = ExternalDataInfo(tensor)
    assert int(info.length) == len(raw) == job_files.tensor_bytes(tensor) == writer.written
    assert b"".join(job_files.iter_chunks(tensor, tmp_path)) == raw
    load_external_data_for_tensor(tensor, str(tmp_path))
    back = numpy_helper.to_array(tensor)
    assert back.dtype == values.dtype and back.shape == values.shape
    assert back.tobytes() == values.tobytes()


def _mlp(data_type: int) -> onnx.ModelProto:
    """x -> MatMul(DequantizeLinear(4-bit weight in int32_data, per column)) + bias -> Relu -> MatMul -> y."""
    inputs, hidden, outputs = 64, 48, 16
    levels = _values(data_type, (inputs, hidden), seed=1)
    zero = _values(data_type, (hidden,), seed=2)
    rng = np.random.default_rng(3)
    inits = [
        _typed("w1_q", levels, data_type),  # 1536 bytes packed: moved to the data file
        _typed("w1_zero", zero, data_type),  # 24 bytes: stays inline
        numpy_helper.from_array(rng.uniform(0.01, 0.1, hidden).astype(np.float32), "w1_scale"),
        numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(hidden, outputs)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w1_q", "w1_scale", "w1_zero"], ["w1"], axis=1),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, outputs])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("data_type", [TensorProto.INT4, TensorProto.UINT4], ids=TensorProto.DataType.Name)
def test_a_typed_4bit_model_runs_and_counts_the_same_from_the_job_folder(tmp_path: Path, data_type: int) -> None:
    model = _mlp(data_type)
    job = job_model.from_proto(model, tmp_path, Limits())
    stored = {t.name: t.data_location for t in job.graph.graph.initializer}
    assert stored["w1_q"] == TensorProto.EXTERNAL and stored["w1_zero"] == TensorProto.DEFAULT

    arrays = [numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer]
    parameters = sum(a.size for a in arrays)
    zeros = sum(int(a.size - np.count_nonzero(a)) for a in arrays)
    assert job.stats.parameters == parameters
    assert job.stats.zero_fraction == pytest.approx(zeros / parameters)

    x = np.random.default_rng(4).normal(size=(2, 64)).astype(np.float32)
    providers = ["CPUExecutionProvider"]
    (expected,) = ort.InferenceSession(model.SerializeToString(), providers=providers).run(None, {"x": x})
    (actual,) = ort.InferenceSession(str(job.path), providers=providers).run(None, {"x": x})
    np.testing.assert_array_equal(actual, expected)


def test_values_in_a_field_their_type_does_not_use_are_refused(tmp_path: Path) -> None:
    model = _mlp(TensorProto.INT4)
    for folder in ("moved", "unpacked"):
        (tmp_path / folder).mkdir()
    weight = model.graph.initializer[0]
    count = len(weight.int32_data)
    weight.int64_data.extend(weight.int32_data)
    del weight.int32_data[:]
    with pytest.raises(InvalidModelError, match="int64_data"):
        job_model.from_proto(model, tmp_path / "moved", Limits())
    weight.int32_data.extend(weight.int64_data)
    del weight.int64_data[:]
    weight.int32_data.extend([0] * count)  # one entry per element (unpacked): twice the packed count
    with pytest.raises(InvalidModelError, match="too large"):
        job_model.from_proto(model, tmp_path / "unpacked", Limits())


def test_strings_and_external_tensors_stay_as_they_are(tmp_path: Path) -> None:
    strings = helper.make_tensor("s", TensorProto.STRING, [512], [b"word"] * 512)
    external = onnx.TensorProto()
    external.CopyFrom(_typed("e", _values(TensorProto.INT4, SHAPE), TensorProto.INT4))
    writer = job_files.DataWriter(tmp_path / "w.data")
    try:
        assert writer.add_inline(external)
        before = external.SerializeToString()
        assert not writer.add_inline(strings)
        assert not writer.add_inline(external)
    finally:
        writer.close()
    assert list(strings.string_data) == [b"word"] * 512 and strings.data_location == TensorProto.DEFAULT
    assert external.SerializeToString() == before and writer.written == job_files.tensor_bytes(external)
