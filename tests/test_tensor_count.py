"""One count of a tensor's values for the model as given and a result counted from its files: bad data is refused.

A data file that ends before an ordinary (not packed) tensor, or a declared length its type and shape do not take,
is an invalid_model error with the tensor's name, not an uncaught ValueError; the same for a result past 2 GiB
(counted from its files by onnx_ops.measure.result_stats), which is counted as it is (NaN included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import onnx_ops.large as large
from onnx_ops import job_files
from onnx_ops.errors import InvalidModelError
from onnx_ops.measure import result_stats
from onnx_ops.tensor_count import count_values

import models

_VALUES = np.array([0.0, 1.5, 0.0, -2.0, 3.0], np.float32)


def _external(folder: Path, file_bytes: bytes, length: int | None = None, name: str = "w") -> TensorProto:
    (folder / "w.bin").write_bytes(file_bytes)
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[5], data_location=TensorProto.EXTERNAL)
    entries = [("location", "w.bin"), ("offset", "0")] + ([("length", str(length))] if length is not None else [])
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def test_a_float_tensor_in_a_data_file_is_counted(tmp_path: Path) -> None:
    assert count_values("w", _external(tmp_path, _VALUES.tobytes()), tmp_path) == (5, 2)
    assert count_values("w", _external(tmp_path, _VALUES.tobytes() + b"\0" * 8, length=20), tmp_path) == (5, 2)


@pytest.mark.parametrize("length", [None, 20], ids=["no length", "length given"])
def test_a_data_file_ending_before_an_ordinary_tensor_is_refused_not_a_crash(tmp_path: Path, length: int | None):
    long_name = "w" * 5000
    tensor = _external(tmp_path, _VALUES.tobytes()[:13], length, name=long_name)
    with pytest.raises(InvalidModelError, match="the data file ends before the tensor does") as caught:
        count_values(long_name, tensor, tmp_path)
    assert len(caught.value.message) < 300  # the tensor's name cut, not repeated in full


@pytest.mark.parametrize("length", [7, 16, 24])
def test_a_declared_length_its_type_and_shape_do_not_take_is_refused(tmp_path: Path, length: int) -> None:
    tensor = _external(tmp_path, _VALUES.tobytes() + b"\0" * 8, length)
    with pytest.raises(InvalidModelError, match="'w': its data does not match its type and shape"):
        count_values("w", tensor, tmp_path)


def test_nan_is_refused_in_the_model_as_given_and_counted_in_a_result(tmp_path: Path) -> None:
    nan = _VALUES.copy()
    nan[1] = np.nan
    tensor = _external(tmp_path, nan.tobytes())
    with pytest.raises(InvalidModelError, match="holds NaN"):
        count_values("w", tensor, tmp_path)
    assert count_values("w", tensor, tmp_path, refuse_nan=False) == (5, 2)
    inline = numpy_helper.from_array(nan, "w")
    with pytest.raises(InvalidModelError, match="holds NaN"):
        count_values("w", inline, tmp_path)
    assert count_values("w", inline, tmp_path, refuse_nan=False) == (5, 2)


def _result_past_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """models.mlp() written as a job writes its result, counted from its files (the one-file limit lowered)."""
    path = job_files.spill(models.mlp(), tmp_path / "compressed.onnx")
    monkeypatch.setattr(large, "ONE_FILE_LIMIT", 16 << 10)
    return path


def test_a_result_whose_data_file_ends_early_is_refused_not_a_crash(tmp_path: Path, monkeypatch) -> None:
    path = _result_past_the_limit(tmp_path, monkeypatch)
    want = sum(int(np.prod(t.dims)) for t in models.mlp().graph.initializer)
    assert result_stats(path).parameters == want
    data = path.with_name("compressed.onnx.data")
    with data.open("r+b") as f:
        f.truncate(data.stat().st_size - 4)
    with pytest.raises(InvalidModelError, match="the data file ends before the tensor does"):
        result_stats(path)


def test_a_packed_tensor_of_a_result_with_the_wrong_length_is_refused(tmp_path: Path, monkeypatch) -> None:
    path = _result_past_the_limit(tmp_path, monkeypatch)
    model = onnx.load(path, load_external_data=False)
    (tmp_path / "packed.bin").write_bytes(bytes(range(256)) * 8 + b"\0")  # one byte more than 4096 INT4 take
    packed = TensorProto(name="packed", data_type=TensorProto.INT4, dims=[4096], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "packed.bin"), ("offset", "0"), ("length", "2049")):
        entry = packed.external_data.add()
        entry.key, entry.value = key, value
    model.graph.initializer.append(packed)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InvalidModelError, match="'packed': its data has 2049 bytes, but 4096 values of 4 bits"):
        result_stats(path)
