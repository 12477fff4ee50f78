"""Models past protobuf's 2 GiB: when they need external data, writing them so, and handing them to libraries.

One serialized ModelProto cannot pass 2 GiB, but a ModelProto held in memory can: its weights then have to go
to a data file beside the ``.onnx`` file whenever it is written, and every consumer that would serialize it
(``InferenceSession(bytes)``, ``onnx.checker.check_model(proto)``, ``SerializeToString`` for the report's sizes)
is given such a pair of files instead. Whether a model fits is decided from its tensors' shapes and types,
without serializing it (protobuf's ``ByteSize`` serializes the whole message to count it).

A model that fits is serialized a node and a tensor at a time (`serialized_chunks`): the same bytes as
``SerializeToString``, which needs twice the model's size on top of the message while it runs (protobuf builds
the encoding in its own buffer, then copies it into the bytes object).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf import unknown_fields
from google.protobuf.message import EncodeError, Message

from onnx_ops.external import PROTOBUF_LIMIT, data_file_name
from onnx_ops.gzip_size import GzipSize
from onnx_ops.validate import iter_tensors

__all__ = [
    "ONE_FILE_LIMIT",
    "PROTOBUF_LIMIT",
    "as_files",
    "check_model",
    "file_sizes",
    "fits_in_one_file",
    "payload_bytes",
    "save_model",
    "serialized_chunks",
    "session_input",
]

# The most one file may hold: protobuf's 2 GiB. A module attribute read at each call, so tests can lower it to
# send small models down the path of models past 2 GiB.
ONE_FILE_LIMIT = PROTOBUF_LIMIT
_TYPED_FIELDS = {  # field -> bytes per element
    "float_data": 4,
    "int32_data": 4,
    "int64_data": 8,
    "double_data": 8,
    "uint64_data": 8,
}
_STRUCTURE_MARGIN = 64 << 20  # room for everything but the tensors' data when a size is decided without serializing
_CHUNK = 1 << 22


def payload_bytes(model: onnx.ModelProto) -> int:
    """The bytes of every tensor's data in the model, from shapes and types (no tensor is read or copied).

    External references count as 0 (their data is not in the message). String tensors count as 0 too.
    """
    total = 0
    for _, tensor in iter_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING:
            continue
        if tensor.HasField("raw_data"):
            bits = int(ir.DataType(tensor.data_type).bitwidth)
            total += (int(math.prod(tensor.dims)) * bits + 7) // 8
        else:
            total += sum(len(getattr(tensor, f)) * size for f, size in _TYPED_FIELDS.items())
    return total


def fits_in_one_file(model: onnx.ModelProto, limit: int | None = None) -> bool:
    """Whether the model serializes to at most `limit` bytes (by default ONE_FILE_LIMIT: protobuf's 2 GiB).

    Decided from `payload_bytes` when it is clearly below or above; only close to the limit is the model
    serialized to count it.
    """
    limit = ONE_FILE_LIMIT if limit is None else limit
    payload = payload_bytes(model)
    if payload + min(_STRUCTURE_MARGIN, limit // 2) <= limit:
        return True
    if payload > limit:
        return False
    try:
        return int(model.ByteSize()) <= limit
    except EncodeError:  # past 2 GiB protobuf cannot even count it
        return False


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    threshold: int | None = None,
) -> bool:
    """Write a model atomically (temp name, then rename), with its tensors in a data file beside it if needed.

    Args:
        model: The model (left unchanged).
        path: Where to write it.
        external_data: True: tensors of 1 KiB or more go to ``data_file_name(path)`` in the same folder,
            referenced by that relative name. False: one self-contained file (a model past 2 GiB cannot be).
            None (the default): external data when the model would be larger than `threshold` bytes.
        threshold: See `external_data`; by default (and at most) ONE_FILE_LIMIT, the most one file can hold.

    Returns:
        Whether the model was written with external data.
    """
    path = Path(path)
    if external_data is None:
        external_data = not fits_in_one_file(model, min(threshold or ONE_FILE_LIMIT, ONE_FILE_LIMIT))
    # Both files are written in a private folder (mode 0700) beside the output, then renamed into place, data
    # first: nobody sees half a file, and a link planted at the data file's name is replaced, not written through.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        if external_data:
            data = data_file_name(path)
            # 64 KiB-aligned offsets for tensors over 1 MiB, so ONNX Runtime can map them rather than copy.
            ir.save(ir.from_proto(model), staged, external_data=data, size_threshold_bytes=1024, alignment=1 << 16)
            os.replace(staging / data, path.parent / data)
        else:
            with staged.open("wb") as f:
                for chunk in serialized_chunks(model):
                    f.write(chunk)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return external_data


@contextlib.contextmanager
def as_files(model: onnx.ModelProto, limit: int | None = None) -> Iterator[Path | None]:
    """None when the model fits in `limit` bytes; else its path, written with external data in a private temp folder.

    The folder (in ``tempfile``'s directory: a job's own temp folder in the service) is removed on exit.
    """
    if fits_in_one_file(model, limit):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="onnx-large-"))
    try:
        path = folder / "model.onnx"
        save_model(model, path, external_data=True)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def session_input(model: onnx.ModelProto | bytes | str | os.PathLike[str]) -> Iterator[bytes | str]:
    """What to give ``onnxruntime.InferenceSession``: the serialized model, or the path of a model past 2 GiB.

    A path given stays a path (ONNX Runtime reads its data files from beside it). The temp files of a model
    past 2 GiB are removed once the session is built (what ONNX Runtime mapped stays valid after removal).
    """
    if isinstance(model, bytes):
        yield model
    elif not isinstance(model, onnx.ModelProto):
        yield os.fspath(model)
    else:
        with as_files(model) as path:
            yield b"".join(serialized_chunks(model)) if path is None else str(path)


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model(model, full_check=False)``, through a file for a model past 2 GiB."""
    with as_files(model) as path:
        onnx.checker.check_model(model if path is None else path, full_check=False)


def file_sizes(model: onnx.ModelProto) -> tuple[int, int]:
    """(bytes, gzip bytes) of the model as written: one file, or past 2 GiB the ``.onnx`` file and its data file.

    The gzip figure of a written pair is the gzip size of the two files one after the other, streamed; past
    onnx_ops.gzip_size.EXACT_BYTES it is an estimate from samples (see there).
    """
    gzip = GzipSize()
    with as_files(model) as path:
        if path is None:
            for chunk in serialized_chunks(model):
                gzip.update(chunk)  # a chunk at a time: no compressed copy kept
            return gzip.size, gzip.finish()
        size = sum(gzip.file(p) for p in (path, path.with_name(data_file_name(path))))
        return size, gzip.finish()


def serialized_chunks(model: onnx.ModelProto) -> Iterator[bytes]:
    """``model.SerializeToString()`` in pieces, the graph a node and an initializer at a time.

    Each piece is what protobuf writes for that part, tag and length first; joined, they are the same bytes
    (protobuf writes known fields in field-number order). While they are made, memory holds one node or
    tensor's encoding besides the message. A model or graph with fields this ONNX does not know is written
    in one piece (where protobuf puts them is its own business).
    """
    if _unknown_fields(model) or (model.HasField("graph") and _unknown_fields(model.graph)):
        yield model.SerializeToString()
        return
    yield _subset(model, lambda n: n < 7).SerializeToString()  # ModelProto.graph is field 7
    if model.HasField("graph"):
        graph = model.graph
        # GraphProto: node 1, name 2, initializer 5, then doc_string, inputs, outputs and the rest.
        head, tail = _subset(graph, lambda n: 1 < n < 5).SerializeToString(), _subset(graph, lambda n: n > 5)
        tail_bytes = tail.SerializeToString()
        nodes, tensors = [n.ByteSize() for n in graph.node], [t.ByteSize() for t in graph.initializer]
        total = len(head) + len(tail_bytes) + sum(1 + len(_varint(size)) + size for size in [*nodes, *tensors])
        yield _varint(7 << 3 | 2) + _varint(total)
        for node, size in zip(graph.node, nodes, strict=True):
            yield _varint(1 << 3 | 2) + _varint(size) + node.SerializeToString()
        yield head
        for tensor, size in zip(graph.initializer, tensors, strict=True):
            yield _varint(5 << 3 | 2) + _varint(size) + tensor.SerializeToString()
        yield tail_bytes
    yield _subset(model, lambda n: n > 7).SerializeToString()


def _unknown_fields(message: Message) -> bool:
    return len(unknown_fields.UnknownFieldSet(message)) > 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _subset(message: Message, keep: Callable[[int], bool]) -> Message:
    """A new message of the same type with only the fields whose numbers `keep` accepts (copied)."""
    part = type(message)()
    for field, value in message.ListFields():
        if not keep(field.number):
            continue
        if field.is_repeated:
            getattr(part, field.name).extend(value)
        elif field.message_type is not None:
            getattr(part, field.name).CopyFrom(value)
        else:
            setattr(part, field.name, value)
    return part
