"""Packed sub-byte tensors (INT4 and the like): their bytes must be exactly ceil(n * bits / 8), inline or in a file."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from onnx_ops import CompressionError, compress, job_model
from onnx_ops.errors import InvalidModelError
from onnx_ops.tensor_count import count_values
from onnx_ops.validate import Limits

_PACKED = bytes([0x21, 0x43, 0x05])  # INT4 values 1 2 3 4 5 (the last byte's high half: padding)


def _int4(raw: bytes, dims: tuple[int, ...] = (5,)) -> TensorProto:
    tensor = TensorProto(name="w", data_type=TensorProto.INT4, dims=list(dims))
    tensor.raw_data = raw
    return tensor


def _model(tensor: TensorProto) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w"], ["c"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "c"], ["y"])],
        "int4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
        [tensor],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _external(folder, length: int, file_bytes: bytes = _PACKED + b"\x77") -> TensorProto:
    (folder / "w.bin").write_bytes(file_bytes)
    tensor = TensorProto(name="w", data_type=TensorProto.INT4, dims=[5], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def test_an_int4_tensor_in_a_data_file_is_counted_when_its_length_is_right(tmp_path):
    assert count_values("w", _external(tmp_path, 3), tmp_path) == (5, 0)


@pytest.mark.parametrize("length", [2, 4])
def test_an_int4_tensor_in_a_data_file_too_short_or_too_long_is_refused(tmp_path, length):
    with pytest.raises(
        InvalidModelError, match=f"'w': its data has {length} bytes, but 5 values of 4 bits packed take 3"
    ):
        count_values("w", _external(tmp_path, length), tmp_path)


def test_a_data_file_that_ends_before_the_tensor_is_refused_not_a_crash(tmp_path):
    with pytest.raises(InvalidModelError, match="the data file ends before"):
        count_values("w", _external(tmp_path, 3, file_bytes=b"\x21"), tmp_path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_PACKED[:2], "raw_data size \\(2 bytes\\) is too small"),  # the ONNX checker finds this one first
        (_PACKED + b"\x00", "its data has 4 bytes, but 5 values of 4 bits packed take 3"),  # decoding would not
    ],
    ids=["too short", "too long"],
)
def test_an_inline_int4_tensor_of_the_wrong_length_fails_the_job_as_an_invalid_model(tmp_path, raw, message):
    model = _model(_int4(raw))
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InvalidModelError, match=message):
        job_model.from_file(path, tmp_path, Limits())
    with pytest.raises(CompressionError, match=message) as caught:
        compress(model, {"steps": [{"kind": "prune", "sparsity": 0.5}]})
    assert caught.value.code == "invalid_model"


def test_an_inline_int4_tensor_of_the_right_length_is_counted(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_model(_int4(_PACKED)).SerializeToString())
    (tmp_path / "job").mkdir()
    job = job_model.from_file(path, tmp_path / "job", Limits())
    assert job.stats.parameters == 5 and job.stats.zero_fraction == 0.0
