"""A tensor's name, the uploader's text of any length, is cut in the messages about its data file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_ops import job_files
from onnx_ops.errors import InvalidModelError
from onnx_ops.tensor_count import count_values

LONG = "w" * 10_000
BOUND = 300  # characters: the sentence and a name cut to the validator's limit


def _cut_short(tmp_path: Path) -> onnx.TensorProto:
    """A 4096-byte tensor named LONG whose data file holds only 100 bytes."""
    tensor = numpy_helper.from_array(np.zeros(1024, np.float32), LONG)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.data"), ("offset", "0"), ("length", "4096")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "w.data").write_bytes(bytes(100))
    return tensor


def test_a_data_file_that_ends_first_names_the_tensor_in_a_bounded_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^the data file ends before tensor 'www") as caught:
        list(job_files.iter_chunks(_cut_short(tmp_path), tmp_path))
    assert len(str(caught.value)) < BOUND, len(str(caught.value))


def test_counting_such_a_tensor_gives_a_bounded_message_and_cause(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="the data file ends before the tensor does") as caught:
        count_values(LONG, _cut_short(tmp_path), tmp_path)
    assert len(str(caught.value)) < BOUND
    assert len(str(caught.value.__cause__)) < BOUND  # the chained error shows in tracebacks and logs
