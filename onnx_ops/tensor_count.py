"""A tensor's values counted (elements, zeros) a chunk at a time from its data file, its data checked on the way.

One implementation for the model as given (onnx_ops.job_model, which also refuses NaN) and for a result counted
from the files the job wrote (onnx_ops.measure.result_stats). Data that does not fit the tensor is refused with
InvalidModelError, never decoded silently nor left to fail as an uncaught exception: a packed sub-byte tensor
(INT4, UINT4, FLOAT4E2M1, INT2...) whose bytes are not ceil(n*bits/8), a data file that ends before the tensor,
a declared length that is not the one its type and shape take.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import external_data_helper, numpy_helper

from onnx_ops.errors import InvalidModelError
from onnx_ops.job_files import iter_chunks, tensor_bytes
from onnx_ops.validate import check_finite, short_name

__all__ = ["count_values"]

_CHUNK = 1 << 24


def count_values(name: str, tensor: onnx.TensorProto, folder: Path, *, refuse_nan: bool = True) -> tuple[int, int]:
    """(elements, zeros) of a tensor; one in a data file (in `folder`) is read a chunk at a time.

    Args:
        name: The tensor's name in messages (cut to a bounded length).
        tensor: The tensor, its data inline or in a data file.
        folder: The folder its data file's location is relative to.
        refuse_nan: Refuse a float tensor holding NaN (the model as given; a compressed model is counted as is).

    Raises:
        InvalidModelError: Its data does not fit its type and shape, or (with `refuse_nan`) it holds NaN.
    """
    if tensor.data_type == onnx.TensorProto.STRING:
        return 0, 0
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        _check_packed(name, tensor)
        array = _decoded(name, tensor)
        if refuse_nan:
            check_finite(name, tensor, array)
        return array.size, int(array.size - np.count_nonzero(array))
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError as e:
        raise InvalidModelError(f"tensor {short_name(name)} has an unknown data type") from e
    if dtype.bitwidth < 8:  # packed sub-byte types: unpacked whole (small: a quarter of a byte per element)
        inline = onnx.TensorProto()
        inline.CopyFrom(tensor)
        del inline.external_data[:]
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = b"".join(_chunks(name, tensor, folder, _CHUNK))
        return count_values(name, inline, folder, refuse_nan=refuse_nan)
    declared = external_data_helper.ExternalDataInfo(tensor).length
    if declared is not None and int(declared) != tensor_bytes(tensor):
        raise InvalidModelError(f"tensor {short_name(name)}: its data does not match its type and shape")
    numpy_type = np.dtype(dtype.numpy()).newbyteorder("<")
    elements = zeros = 0
    rest = b""  # a read that stopped inside a value (the file ended: refused at the next read)
    for chunk in _chunks(name, tensor, folder, _CHUNK - _CHUNK % numpy_type.itemsize):
        data = rest + chunk if rest else chunk
        whole = len(data) - len(data) % numpy_type.itemsize
        rest = data[whole:]
        array = np.frombuffer(memoryview(data)[:whole], dtype=numpy_type)
        if refuse_nan:
            check_finite(name, tensor, array)
        elements += array.size
        zeros += int(array.size - np.count_nonzero(array))
    return elements, zeros


def _chunks(name: str, tensor: onnx.TensorProto, folder: Path, size: int) -> Iterator[bytes]:
    """The tensor's bytes from its data file, `size` at a time; a file that ends first is refused."""
    try:
        yield from iter_chunks(tensor, folder, size)
    except ValueError as e:  # refused as a model error, in the words the other checks use
        raise InvalidModelError(f"tensor {short_name(name)}: the data file ends before the tensor does") from e


def _check_packed(name: str, tensor: onnx.TensorProto) -> None:
    """Refuse a packed sub-byte tensor whose raw bytes are not ceil(n*bits/8).

    Decoding alone would not: onnx reads what the shape needs from longer data and ignores the rest.
    """
    try:
        bits = int(ir.DataType(tensor.data_type).bitwidth)
    except (ValueError, TypeError):  # no such type, or no bit width (refused when decoded)
        return
    if bits >= 8 or not tensor.HasField("raw_data"):
        return
    need = tensor_bytes(tensor)
    if len(tensor.raw_data) != need:
        raise InvalidModelError(
            f"tensor {short_name(name)}: its data has {len(tensor.raw_data)} bytes, but "
            f"{math.prod(tensor.dims)} values of {bits} bits packed take {need}"
        )


def _decoded(name: str, tensor: onnx.TensorProto) -> np.ndarray:
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError) as e:
        raise InvalidModelError(f"tensor {short_name(name)} cannot be decoded: {e}") from e
