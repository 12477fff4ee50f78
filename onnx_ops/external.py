"""External data: models whose tensors live in files beside them, loaded after checks and written past 2 GB.

A tensor's external location is a path chosen by whoever made the file, so every reference is checked before any
byte is read (ONNX itself fixed external-data path traversal several times: CVE-2022-25882, CVE-2024-27318):

- the location is a relative name (``data.bin`` or ``weights/data.bin``): no absolute path, drive letter,
  backslash, NUL, ``.`` or ``..`` component;
- it is opened component by component from the model's own folder without following any symbolic link, and
  must be a regular file with a single hard link, other than the model file itself;
- offset and length are plain decimal numbers, inside the file, and the length is what the tensor's data type
  and shape need;
- the keys are the ones ONNX defines, each at most once; the tensor holds no inline data besides.

The bytes are then read with ``pread`` after opening each file again the same way and finding the very file
that was checked (same device, inode and size), so a file swapped after the check is not read; a file that
shrinks while it is read is refused. The bytes go into the tensor, or (``take``) are handed over a chunk at a
time: a job copies the weights into its own data file that way (onnx_ops.job_files), never holding them. The
uploader's files are never memory-mapped: one truncated under a mapping would kill the process with SIGBUS (the
job maps only its own copy, or data files handed over to it and moved into its own folder: `move_external_data`).
Writing models past 2 GiB (and handing them to ONNX Runtime): see onnx_ops.large.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from onnx_ops.bounds import cut
from onnx_ops.errors import InvalidModelError

__all__ = [
    "PROTOBUF_LIMIT",
    "data_file_name",
    "has_external_data",
    "load_external_data",
    "move_external_data",
]

PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF  # one serialized ModelProto: 2 GiB - 1 byte
_KEYS = frozenset({"location", "offset", "length", "checksum"})
_MAX_LOCATION_CHARS = 4096
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

Tensors = Iterable[tuple[str, onnx.TensorProto]]
# Takes a tensor's bytes instead of reading them into it: (tensor, its bytes a chunk at a time, their length) ->
# whether it took them (False: they are read into the tensor).
Take = Callable[[onnx.TensorProto, Iterator[bytes], int], bool]


@dataclasses.dataclass(frozen=True)
class _Reference:
    label: str
    tensor: onnx.TensorProto
    parts: tuple[str, ...]
    offset: int
    length: int | None


def has_external_data(tensor: onnx.TensorProto) -> bool:
    """Whether the tensor says it is stored outside the model file (by its flag or by its entries)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def load_external_data(model_path: Path, tensors: Tensors, *, max_bytes: int, take: Take | None = None) -> int:
    """Check every external reference of a parsed model, then read the data into the tensors.

    Args:
        model_path: The model file; its folder is the only place data files may be.
        tensors: Every tensor of the model with a label naming it (validate.iter_tensors).
        max_bytes: Cap on the bytes read in total (a range named by many tensors counts each time).
        take: Offered each tensor's bytes first (see `Take`); what it does not take is read into the tensor.

    Returns:
        The number of bytes read (0 when the model is self-contained).

    Raises:
        InvalidModelError: naming the first tensor whose reference is refused; nothing has been read then.
    """
    references = [_reference(label, tensor) for label, tensor in tensors if has_external_data(tensor)]
    if not references:
        return 0
    folder = os.open(model_path.parent, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        model_id = _identity(os.stat(model_path))
        files: dict[tuple[str, ...], tuple[int, int, int]] = {}  # parts -> (device, inode, size)
        total = 0
        for ref in references:  # every check first, nothing read
            if ref.parts not in files:
                fd, st = _open_checked(folder, ref, model_id)
                os.close(fd)  # not held: a model may have thousands of data files (one per tensor)
                files[ref.parts] = (*_identity(st), st.st_size)
            total += _check_range(ref, files[ref.parts][2])
            if total > max_bytes:
                raise _refuse(
                    ref.label,
                    f"brings the data read past the {max_bytes} bytes allowed for a model's data files "
                    "(Limits.max_external_bytes; the service's COMPRESS_MAX_BUNDLE_MB)",
                )
        by_file: dict[tuple[str, ...], list[_Reference]] = {}
        for ref in references:
            by_file.setdefault(ref.parts, []).append(ref)
        for parts, refs in by_file.items():  # opened again the same way: it must be the very file checked
            fd, st = _open_checked(folder, refs[0], model_id)
            try:
                if (*_identity(st), st.st_size) != files[parts]:
                    raise _refuse(refs[0].label, "file changed while the model was being loaded")
                for ref in refs:
                    _read_into(ref, fd, st.st_size, take)
            finally:
                os.close(fd)
        return total
    finally:
        os.close(folder)


def move_external_data(model_path: Path, tensors: Tensors, dest: Path, prefix: str) -> None:
    """Move the data files the tensors refer to into the folder `dest`, and point the tensors there.

    For data files the caller hands over (a service's unpacked bundle), checked by `load_external_data` first: the
    weights are then not copied. Each file is checked again as it is read, renamed from the folder it was found
    in (never through a link) to ``<prefix><n>`` in `dest` (same file system), and must arrive there as the very
    file checked (same device, inode and size, one link). Every reference is rewritten by the job: the new
    location, offset and length as plain numbers, nothing else.

    Raises:
        InvalidModelError: a file that cannot be moved, or that changed since it was checked.
    """
    references = [_reference(label, tensor) for label, tensor in tensors if has_external_data(tensor)]
    folder = os.open(model_path.parent, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    target = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        model_id = _identity(os.stat(model_path))
        moved: dict[tuple[str, ...], tuple[str, int]] = {}  # parts -> (new name, size)
        for ref in references:
            if ref.parts not in moved:
                name = f"{prefix}{len(moved)}"
                moved[ref.parts] = name, _move_checked(folder, ref, model_id, target, name)
            name, size = moved[ref.parts]
            length = _check_range(ref, size)
            del ref.tensor.external_data[:]
            for key, value in (("location", name), ("offset", str(ref.offset)), ("length", str(length))):
                ref.tensor.external_data.add(key=key, value=value)
    finally:
        os.close(target)
        os.close(folder)


def _move_checked(folder: int, ref: _Reference, model_id: tuple[int, int], target: int, name: str) -> int:
    """Rename the checked data file of `ref` to `name` in the folder `target`; its size."""
    fd, st = _open_checked(folder, ref, model_id)
    os.close(fd)
    parent = os.dup(folder)
    try:
        for part in ref.parts[:-1]:  # each folder opened without following a link, as _open_checked did
            child = os.open(part, _OPEN_FLAGS | os.O_DIRECTORY, dir_fd=parent)
            os.close(parent)
            parent = child
        os.rename(ref.parts[-1], name, src_dir_fd=parent, dst_dir_fd=target)
        arrived = os.stat(name, dir_fd=target, follow_symlinks=False)
    except OSError as e:
        raise _refuse(ref.label, f"file cannot be moved into the job's folder ({os.strerror(e.errno or 0)})") from e
    finally:
        os.close(parent)
    same = (*_identity(arrived), arrived.st_size) == (*_identity(st), st.st_size)
    if not same or not stat.S_ISREG(arrived.st_mode) or arrived.st_nlink != 1:
        raise _refuse(ref.label, "file changed while the model was being loaded")
    return st.st_size


def data_file_name(model_path: str | os.PathLike[str]) -> str:
    """The name of the data file written beside a model saved with external data: ``<model file name>.data``."""
    return Path(model_path).name + ".data"


def _quote(text: str) -> str:
    return repr(cut(text, 80))


def _refuse(ref_label: str, reason: str) -> InvalidModelError:
    return InvalidModelError(f"tensor {_quote(ref_label)}: external data {reason}")


def _reference(label: str, tensor: onnx.TensorProto) -> _Reference:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        raise _refuse(label, "entries on a tensor not marked as external (data_location is not EXTERNAL)")
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in _KEYS:
            raise _refuse(label, f"has an unknown key {_quote(entry.key)} (known: location, offset, length, checksum)")
        if entry.key in entries:
            raise _refuse(label, f"names {entry.key!r} twice")
        entries[entry.key] = entry.value
    if "location" not in entries:
        raise _refuse(label, "has no location")
    if tensor.HasField("raw_data") or _has_typed_data(tensor):
        raise _refuse(label, "is given together with inline data")
    return _Reference(
        label=label,
        tensor=tensor,
        parts=_location_parts(label, entries["location"]),
        offset=_number(label, entries, "offset") or 0,
        length=_number(label, entries, "length"),
    )


def _has_typed_data(tensor: onnx.TensorProto) -> bool:
    fields = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
    return any(len(getattr(tensor, field)) > 0 for field in fields)


def _location_parts(label: str, location: str) -> tuple[str, ...]:
    shown = _quote(location)
    if not location or len(location) > _MAX_LOCATION_CHARS or "\0" in location:
        raise _refuse(label, f"location {shown} is empty, too long or holds a NUL character")
    if location.startswith("/") or "\\" in location or (len(location) > 1 and location[1] == ":"):
        # not echoed: it may be a path of the machine that made the file
        raise _refuse(label, "location is not a relative name (an absolute path, a drive or a backslash)")
    parts = tuple(location.split("/"))
    if any(part in ("", ".", "..") for part in parts):
        raise _refuse(label, f"location {shown} must name a file inside the model's folder (no '..', '.' or '//')")
    return parts


def _number(label: str, entries: dict[str, str], key: str) -> int | None:
    value = entries.get(key)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise _refuse(label, f"{key} {_quote(value)} is not a non-negative whole number")
    return int(value)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _open_checked(folder: int, ref: _Reference, model_id: tuple[int, int]) -> tuple[int, os.stat_result]:
    """Open the data file from the model's folder without following links; (descriptor, its fstat)."""
    shown = _quote("/".join(ref.parts))
    fd = os.dup(folder)
    try:
        for index, part in enumerate(ref.parts):
            last = index == len(ref.parts) - 1
            flags = _OPEN_FLAGS | (os.O_NONBLOCK if last else os.O_DIRECTORY)  # a FIFO must not block the open
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                raise _refuse(ref.label, f"location {shown} {_open_failure(e, fd, part)}") from e
            os.close(fd)
            fd = child
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(ref.label, f"location {shown} is not a regular file")
        if st.st_nlink != 1:
            raise _refuse(ref.label, f"location {shown} has {st.st_nlink} hard links; a data file must have one")
        if _identity(st) == model_id:
            raise _refuse(ref.label, f"location {shown} is the model file itself")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _open_failure(e: OSError, folder: int, part: str) -> str:
    if e.errno == errno.ENOENT:
        return "does not exist in the model's folder"
    if e.errno in (errno.ELOOP, errno.EMLINK) or _is_link(folder, part):  # a linked folder gives ENOTDIR
        return "is (or passes through) a symbolic link"
    if e.errno == errno.ENOTDIR:
        return "passes through something that is not a folder"
    return f"cannot be opened ({os.strerror(e.errno or 0)})"


def _is_link(folder: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _check_range(ref: _Reference, size: int) -> int:
    """Check offset and length against the file and the tensor; the tensor's length in bytes."""
    if ref.offset > size:
        raise _refuse(ref.label, f"offset {ref.offset} is past the end of its file ({size} bytes)")
    length = size - ref.offset if ref.length is None else ref.length
    if ref.offset + length > size:
        raise _refuse(ref.label, f"range {ref.offset}+{length} bytes ends past the end of its file ({size} bytes)")
    expected = _expected_bytes(ref)
    if length != expected:
        raise _refuse(ref.label, f"length is {length} bytes but the tensor's data type and shape need {expected} bytes")
    return length


def _expected_bytes(ref: _Reference) -> int:
    tensor = ref.tensor
    if any(d < 0 for d in tensor.dims):
        raise _refuse(ref.label, "is declared on a tensor with a negative dimension")
    try:
        bits = int(ir.DataType(tensor.data_type).bitwidth)
    except (ValueError, TypeError) as e:  # unknown types, and STRING (never stored externally)
        raise _refuse(ref.label, f"is not supported for data type {tensor.data_type}") from e
    return (int(math.prod(tensor.dims)) * bits + 7) // 8  # whole numbers: a float loses bytes past 2**53


def _read_into(ref: _Reference, fd: int, size: int, take: Take | None) -> None:
    length = size - ref.offset if ref.length is None else ref.length
    if take is not None and take(ref.tensor, _pread_all(ref, fd, length, 1 << 24), length):
        return
    ref.tensor.raw_data = b"".join(_pread_all(ref, fd, length, 1 << 30))  # one pread returns at most ~2 GiB
    del ref.tensor.external_data[:]
    ref.tensor.data_location = onnx.TensorProto.DEFAULT


def _pread_all(ref: _Reference, fd: int, length: int, chunk: int) -> Iterator[bytes]:
    """The range's bytes, `chunk` at a time; refused when the file ends before the range does."""
    offset = ref.offset
    while length > 0:
        part = os.pread(fd, min(chunk, length), offset)
        if not part:
            raise _refuse(ref.label, "file became shorter while it was read")
        yield part
        offset += len(part)
        length -= len(part)
