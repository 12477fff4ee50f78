"""A job's models on disk: a weightless ``.onnx`` file, its weights in ``<name>.data`` beside it, mapped when read.

A session built from bytes keeps those bytes and copies every weight; one built from a model file whose weights
sit in a data file at aligned offsets maps them instead. The passes get the weights as arrays mapped from the data
file (`load_ir`), so a job holds in memory only what a pass creates. A ModelProto given to `spill` is emptied of
its weights (they move to the data file) until `restore` reads them back.

Only the job's own files are mapped (a file truncated under a mapping kills the process with SIGBUS, and nothing
else writes to the job's private folder); an uploader's data files are copied in first (onnx_ops.job_model).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx_ir as ir
from onnx import external_data_helper

from onnx_ops.validate import short_name

__all__ = [
    "DataWriter",
    "iter_chunks",
    "load",
    "load_ir",
    "remapped",
    "restore",
    "save_sharing",
    "spill",
    "tensor_bytes",
]

THRESHOLD = 1024  # tensors of at least this many bytes go to the data file
_ALIGN = 1 << 16  # tensors past 1 MiB start at 64 KiB offsets: ONNX Runtime maps them rather than copy them
_ALIGN_FROM = 1 << 20
_SMALL_ALIGN = 64
_CHUNK = 1 << 24
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes a tensor's data takes stored raw, from its type and shape (strings: 0)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    return (int(math.prod(tensor.dims)) * int(ir.DataType(tensor.data_type).bitwidth) + 7) // 8


class DataWriter:
    """Appends tensors' bytes to one new data file at aligned offsets and points each tensor at them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = path.open("xb")
        self.written = 0

    def add(self, tensor: onnx.TensorProto, chunks: Iterable[bytes], length: int) -> bool:
        """Write the tensor's bytes (`length` of them, in chunks) and make it refer to them; True (it took them)."""
        align = _ALIGN if length > _ALIGN_FROM else _SMALL_ALIGN
        offset = -(-self.file.tell() // align) * align
        self.file.seek(offset)
        written = 0
        for chunk in chunks:
            self.file.write(chunk)
            written += len(chunk)
        if written != length:
            raise ValueError(f"{written} bytes of data where its data type and shape need {length}")
        self.written += length
        for field in ("raw_data", *_TYPED_FIELDS):
            tensor.ClearField(field)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return True

    def add_inline(self, tensor: onnx.TensorProto) -> bool:
        """Move an inline tensor's data (raw or in typed fields) to the file when it has THRESHOLD bytes or more.

        Typed fields are written as raw_data would hold them (see `_typed_bytes`); strings (no raw form) and
        tensors already external stay as they are (False).

        Raises:
            ValueError: The tensor's data does not match its data type and shape.
        """
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING:
            return False
        length = tensor_bytes(tensor)
        if length < THRESHOLD:
            return False
        data = tensor.raw_data if tensor.HasField("raw_data") else _typed_bytes(tensor)
        if len(data) != length:
            size = "small" if len(data) < length else "large"
            raise ValueError(f"its data has {len(data)} bytes, too {size} for its data type and shape ({length})")
        return self.add(tensor, [data], length)

    def close(self) -> None:
        """Flush and close the file."""
        self.file.close()


def _typed_bytes(tensor: onnx.TensorProto) -> bytes:
    """A tensor's values held in typed fields (``int32_data``...) as its raw_data would hold them.

    Serialised by onnx_ir, value for value: little endian, INT4, UINT4, FLOAT4E2M1, INT2 and UINT2 kept packed
    as the typed field holds them, FLOAT6 packed. A count of values that does not fit the shape shows in the
    length (the caller refuses it; decoding them with onnx would drop extra packed values).

    Raises:
        ValueError: The values are in a field other than the one their data type uses.
    """
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    stray = [name for name in _TYPED_FIELDS if name != field and len(getattr(tensor, name))]
    if stray:
        raise ValueError(f"its values are in {stray[0]}, where its data type keeps them in {field}")
    return ir.serde.TensorProtoTensor(tensor).tobytes()


def spill(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path` with its main graph's weights in ``<name>.data`` beside it, moving them out of it.

    Returns:
        `path`. `model` keeps its graph; its large initializers refer to the data file until `restore`.
    """
    writer = DataWriter(path.with_name(f"{path.name}.data"))
    try:
        for tensor in model.graph.initializer:
            writer.add_inline(tensor)
    finally:
        writer.close()
    path.write_bytes(model.SerializeToString())
    return path


def restore(model: onnx.ModelProto, folder: Path) -> None:
    """Read the weights `spill` moved out of `model` back into it, exactly as they were (no location field left)."""
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(folder))
            tensor.ClearField("data_location")


def load(path: Path) -> onnx.ModelProto:
    """A model `spill` (or `onnx_ops.external.save_model`) wrote, with its weights read back in."""
    model = onnx.load(path, load_external_data=False)
    restore(model, path.parent)
    return model


def iter_chunks(tensor: onnx.TensorProto, folder: Path, chunk: int = _CHUNK) -> Iterator[bytes]:
    """The bytes of a tensor of a model in `folder` that refers to its data file, `chunk` at a time."""
    info = external_data_helper.ExternalDataInfo(tensor)
    length = tensor_bytes(tensor) if info.length is None else int(info.length)
    with (folder / info.location).open("rb") as f:
        f.seek(int(info.offset or 0))
        while length > 0:
            part = f.read(min(chunk, length))
            if not part:
                raise ValueError(f"the data file ends before tensor {short_name(tensor.name)} does")
            yield part
            length -= len(part)


def load_ir(path: Path) -> ir.Model:
    """The model at `path` as IR, each weight in its data file memory-mapped (copy-on-write), not read.

    The arrays behave like those of a model read into memory (`to_proto` copies them in); pages are read
    as a pass touches them and count as the file's, which the kernel can drop and read again.
    """
    model = ir.from_proto(onnx.load(path, load_external_data=False))
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            value.const_value = _mapped(tensor, path.parent)
    return model


def remapped(tensor: ir.TensorProtocol) -> ir.TensorProtocol | None:
    """A weight `load_ir` mapped, mapped afresh (the pages the old mapping read leave memory with it); else None.

    Only for a weight nothing wrote to: the copy-on-write pages written to would be lost.
    """
    array = getattr(tensor, "raw", None)
    if not isinstance(array, np.memmap) or not array.filename:
        return None
    fresh = np.memmap(array.filename, dtype=array.dtype, mode="c", offset=array.offset, shape=array.shape)
    return ir.Tensor(fresh, dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string)


def save_sharing(model: ir.Model, path: Path) -> Path:
    """`model` written to `path` for ONNX Runtime, its weights referred to where they already are on disk.

    A weight that `load_ir` mapped from a data file in `path`'s folder is referred to in that file
    (nothing written); the other weights of at least THRESHOLD bytes go to ``<name>.data`` beside `path`, at
    aligned offsets. Only for weights no pass has written to: a mapping is copy-on-write, so a weight changed in
    place in memory is not changed in its file. The model is left unchanged.
    """
    folder = path.parent
    kept: list[tuple[ir.Value, ir.TensorProtocol]] = []
    data = path.with_name(f"{path.name}.data")
    try:
        with data.open("wb") as file:
            for value in (v for graph in model.graphs() for v in graph.initializers.values()):
                tensor = value.const_value
                if tensor is None or (tensor.nbytes < THRESHOLD and not isinstance(tensor, ir.ExternalTensor)):
                    continue
                shared = _shared_location(tensor, folder)
                if shared is None:
                    align = _ALIGN if tensor.nbytes > _ALIGN_FROM else _SMALL_ALIGN
                    file.seek(-(-file.tell() // align) * align)
                    shared = (data.name, file.tell())
                    file.write(tensor.tobytes())
                kept.append((value, tensor))
                value.const_value = ir.ExternalTensor(
                    shared[0],
                    shared[1],
                    tensor.nbytes,
                    tensor.dtype,
                    shape=ir.Shape(tensor.shape.numpy()),
                    name=value.name or "",
                    base_dir=folder,
                )
        ir.save(model, path)  # the external references as they are
    finally:
        for value, tensor in kept:
            value.const_value = tensor
    return path


def _shared_location(tensor: ir.TensorProtocol, folder: Path) -> tuple[str, int] | None:
    """(file name, offset) of a weight mapped whole from a data file in `folder` (see `_mapped`), else None."""
    raw = tensor.raw if isinstance(tensor, ir.Tensor) else None
    if (
        isinstance(raw, np.memmap)
        and isinstance(raw.base, mmap.mmap)  # the mapping itself, not a view into it
        and raw.flags.c_contiguous
        and raw.filename is not None
        and Path(raw.filename).resolve().parent == folder.resolve()
    ):
        return Path(raw.filename).name, int(raw.offset)
    return None


def _mapped(tensor: ir.ExternalTensor, folder: Path) -> ir.TensorProtocol:
    dtype = tensor.dtype
    if dtype.bitwidth < 8 or tensor.size == 0:  # packed sub-byte types: unpacked into memory by onnx_ir
        tensor.base_dir = folder
        (loaded,) = ir.external_data.convert_tensors_from_external([tensor])
        return loaded
    array = np.memmap(
        folder / tensor.location,
        dtype=np.dtype(dtype.numpy()).newbyteorder("<"),
        mode="c",
        offset=tensor.offset or 0,
        shape=tuple(int(d) for d in tensor.shape.numpy()),
    )
    return ir.Tensor(array, dtype=dtype, name=tensor.name, doc_string=tensor.doc_string)
