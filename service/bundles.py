"""Bundle uploads: a .zip or .tar holding a model and its external data files, unpacked safely for one job.

A bundle is unpacked in the job's own process (under its limits), into a fresh folder of the job that holds
nothing else, so the model's external data references can only name files of the bundle. Every member is
checked before anything is written: names relative, without ``.``, ``..``, backslashes or NUL, each used once
(and never both as a file and as a folder); only regular files and folders (no symbolic or hard links,
devices, FIFOs, sparse files); at most ``max_members`` members; each file and the total within the caps; in a
zip only stored or deflated, unencrypted members whose declared size is at most ``max_ratio`` times their
compressed size. A tar must be uncompressed (its sizes are then real). Files are then written with
``O_EXCL | O_NOFOLLOW``, counting the bytes actually produced against what the archive declared. The job
deletes the archive once it is unpacked (a tar's bytes are freed already as each file is written out:
`unpack(consume=True)`, service.hole_punch), then checks the data files and moves them into its own folder
(service.job_upload, onnx_ops.external.move_external_data), and deletes what is left of the unpacked files once
it has its own copy of the model (`drop_unpacked`): a tar bundle's weights are on disk once while the job unpacks
and validates them, not twice (a zip's: twice while it unpacks, its members may be compressed).

Results go the other way: a compressed model written with external data (past 2 GiB, or when the plan asks
with ``external_data``) is returned as ``output.zip`` holding ``model.onnx`` and ``model.onnx.data`` (stored,
ZIP64 past 4 GiB), a bundle this module itself accepts; any other result is the single ``output.onnx``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from onnx_ops.bounds import cut
from onnx_ops.errors import InvalidModelError
from service.hole_punch import open_for_punching, punch_hole

if TYPE_CHECKING:
    from onnx_ops.pipeline import CompressionResult

__all__ = [
    "RESULT_MODEL",
    "UNPACKED",
    "BundleCaps",
    "ResultFile",
    "bundle_kind",
    "drop_unpacked",
    "result_file",
    "save_result",
    "unpack",
    "unpacked_model",
]

RESULT_MODEL = "model.onnx"  # the compressed model's name inside a result zip; its data file: model.onnx.data
UNPACKED = "model"  # the folder of a job folder a bundle is unpacked into

_CHUNK = 1 << 20
_MAX_NAME_CHARS = 1024


@dataclasses.dataclass(frozen=True)
class BundleCaps:
    """Caps on what a bundle may unpack to."""

    max_total_bytes: int
    max_file_bytes: int
    max_members: int = 2048  # exporters may write one data file per tensor
    max_ratio: int = 100  # declared size over compressed size, per zip member


@dataclasses.dataclass(frozen=True)
class _Member:
    parts: tuple[str, ...]
    size: int
    is_dir: bool
    open: Callable[[], IO[bytes]]
    start: int = -1  # where its bytes sit in the archive as they are (a tar's file), or -1


def bundle_kind(path: Path) -> str | None:
    """'zip' or 'tar' when the file is one (by its content, not its name), else None."""
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def unpack(path: Path, dest: Path, caps: BundleCaps, *, consume: bool = False) -> Path:
    """Unpack a bundle into the new folder `dest`; the path of its one .onnx file.

    With `consume` (the caller deletes the archive afterwards, and reads it no more) a tar's bytes are freed as
    each file is written out (service.hole_punch), so the archive and its files are not both on disk whole; a
    zip's are not (its members may be compressed).

    Raises:
        InvalidModelError: naming the first member refused (nothing is written then), or the archive's flaw.
    """
    kind = bundle_kind(path)
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as archive:
                return _unpack(list(_zip_members(archive, caps)), dest, caps)
        if kind == "tar":
            punch = open_for_punching(path) if consume else None
            try:
                with tarfile.open(path, mode="r:") as archive:
                    return _unpack(list(_tar_members(archive, caps)), dest, caps, punch)
            finally:
                if punch is not None:
                    os.close(punch)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, UnicodeDecodeError) as e:
        raise InvalidModelError(f"the bundle is not a readable {kind} archive: {cut(str(e), 200)}") from e
    raise InvalidModelError("the bundle is neither a zip nor an uncompressed tar archive")


def unpacked_model(folder: Path) -> Path:
    """The one .onnx file of a folder `unpack` wrote (found again, as `unpack` returned it)."""
    found = [
        Path(root, name)
        for root, _, names in os.walk(folder)  # links are not followed (unpack writes none)
        for name in names
        if name.lower().endswith(".onnx")
    ]
    if len(found) != 1:
        raise InvalidModelError(f"the bundle must hold exactly one .onnx file; it holds {len(found)}")
    return found[0]


def drop_unpacked(job_folder: Path) -> None:
    """Delete the files a bundle was unpacked into (the job folder's `UNPACKED` folder), if it has them.

    Only that folder goes: it holds what `unpack` wrote and nothing else (regular files it created, no links),
    and a link put in its place is not followed (nor is any inside it).
    """
    target = job_folder / UNPACKED
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)


def _refuse(name: str, reason: str) -> InvalidModelError:
    return InvalidModelError(f"bundle member {cut(name, 80)!r} {reason}")


def _parts(name: str) -> tuple[str, ...]:
    if not name or len(name) > _MAX_NAME_CHARS or "\0" in name:
        raise _refuse(name, "has an empty, overlong or NUL-holding name")
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        # not echoed: it may be a path of the machine that made the archive
        raise InvalidModelError(
            "a bundle member's name is not a relative name (an absolute path, a drive or a backslash)"
        )
    parts = tuple(name.split("/"))
    if any(part in ("", ".", "..") or len(part.encode()) > 255 for part in parts):
        raise _refuse(name, "must name a place inside the bundle (no '..', '.' or '//')")
    return parts


def _zip_members(archive: zipfile.ZipFile, caps: BundleCaps) -> Iterator[_Member]:
    infos = archive.infolist()
    if len(infos) > caps.max_members:
        raise InvalidModelError(f"the bundle has {len(infos)} members, more than the limit of {caps.max_members}")
    for info in infos:
        is_dir = info.filename.endswith("/")
        parts = _parts(info.filename[:-1] if is_dir else info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode) or (stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR)):
            raise _refuse(info.filename, "is a link or a special file; only files and folders are accepted")
        if info.flag_bits & 0x1:
            raise _refuse(info.filename, "is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _refuse(info.filename, "uses a compression other than stored or deflate")
        if info.file_size > caps.max_ratio * max(info.compress_size, 1) and info.file_size > _CHUNK:
            raise _refuse(
                info.filename,
                f"declares {info.file_size} bytes from {info.compress_size} compressed: more than "
                f"{caps.max_ratio} times (a zip bomb?)",
            )
        yield _Member(parts, 0 if is_dir else info.file_size, is_dir, functools.partial(archive.open, info))


def _tar_members(archive: tarfile.TarFile, caps: BundleCaps) -> Iterator[_Member]:
    for count, member in enumerate(archive, 1):  # header by header: capped before the listing grows
        if count > caps.max_members:
            raise InvalidModelError(f"the bundle has more than {caps.max_members} members, the limit")
        parts = _parts(member.name.rstrip("/") if member.isdir() else member.name)
        if member.isdir():
            yield _Member(parts, 0, True, lambda: _no_content())
        elif member.isreg() and not member.issparse():
            yield _Member(parts, member.size, False, functools.partial(_tar_open, archive, member), member.offset_data)
        else:
            raise _refuse(member.name, "is a link or a special file; only files and folders are accepted")


def _no_content() -> IO[bytes]:
    raise AssertionError("a folder has no content")


def _tar_open(archive: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    f = archive.extractfile(member)
    assert f is not None  # a regular member always has content
    return f


def _unpack(members: list[_Member], dest: Path, caps: BundleCaps, punch: int | None = None) -> Path:
    files: set[tuple[str, ...]] = set()
    folders: set[tuple[str, ...]] = set()  # listed as members
    implied: set[tuple[str, ...]] = set()  # holding a member
    total = 0
    for m in members:
        name = "/".join(m.parts)
        if m.parts in files or m.parts in folders:
            raise _refuse(name, "appears twice in the bundle")
        (folders if m.is_dir else files).add(m.parts)
        implied.update(m.parts[:depth] for depth in range(1, len(m.parts)))
        if m.size > caps.max_file_bytes:
            raise _refuse(name, f"has {m.size} bytes, more than the limit of {caps.max_file_bytes} per file")
        total += m.size
        if total > caps.max_total_bytes:
            raise InvalidModelError(f"the bundle unpacks to more than the limit of {caps.max_total_bytes} bytes")
    clash = files & implied
    if clash:
        raise _refuse("/".join(min(clash)), "is both a file and a folder")
    models = [m for m in members if not m.is_dir and m.parts[-1].lower().endswith(".onnx")]
    if len(models) != 1:
        raise InvalidModelError(f"the bundle must hold exactly one .onnx file; it holds {len(models)}")
    dest.mkdir(mode=0o700)
    for m in members:
        target = dest.joinpath(*m.parts)
        target.parent.mkdir(parents=True, exist_ok=True)  # only folders we made ourselves: no links
        if m.is_dir:
            target.mkdir(exist_ok=True)
        else:
            _write(m, target, punch)
    return dest.joinpath(*models[0].parts)


def _write(member: _Member, target: Path, punch: int | None) -> None:
    """Write the member's bytes to `target`; with `punch` (the archive), free each part of it once written."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    written = 0
    with os.fdopen(fd, "wb") as out, member.open() as src:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > member.size:
                raise _refuse("/".join(member.parts), "holds more bytes than its header declares")
            out.write(chunk)
            if punch is not None and member.start >= 0:  # only bytes this member has read: nothing reads them again
                punch_hole(punch, member.start + written - len(chunk), len(chunk))
    if written != member.size:
        raise _refuse("/".join(member.parts), "holds fewer bytes than its header declares")


@dataclasses.dataclass(frozen=True)
class ResultFile:
    """A job's compressed model as it is downloaded."""

    name: str  # in the job folder
    media_type: str
    suffix: str  # of the download's name
    files: tuple[str, ...]  # what the download holds


_SINGLE = ResultFile("output.onnx", "application/octet-stream", ".onnx", ())
_ZIPPED = ResultFile("output.zip", "application/zip", ".zip", (RESULT_MODEL, RESULT_MODEL + ".data"))


def result_file(folder: Path) -> ResultFile | None:
    """Which result a job folder holds: the single .onnx, the zip of a model with external data, or None."""
    for result in (_ZIPPED, _SINGLE):
        if (folder / result.name).exists():
            return result
    return None


def save_result(result: CompressionResult, folder: Path, *, threshold: int, external_data: bool = False) -> ResultFile:
    """Write the compressed model into the job folder: ``output.onnx``, or ``output.zip`` with external data.

    Args:
        result: The compression's result.
        folder: The job folder.
        threshold: A model larger than this many bytes is written with external data (at most 2 GiB).
        external_data: Write it with external data whatever its size.

    Returns:
        What was written. Either file appears whole (written under a temp name, then renamed).
    """
    staging = folder / "result"
    shutil.rmtree(staging, ignore_errors=True)  # a retried job writes again
    staging.mkdir(mode=0o700)
    try:
        model = staging / RESULT_MODEL
        if not result.save(model, external_data=True if external_data else None, threshold=threshold):
            os.replace(model, folder / _SINGLE.name)
            return _SINGLE
        partial = folder / f".{_ZIPPED.name}.tmp"
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name in _ZIPPED.files:  # stored: weights barely deflate, and a reader can map them in place
                archive.write(staging / name, arcname=name)
        os.replace(partial, folder / _ZIPPED.name)
        return _ZIPPED
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        (folder / f".{_ZIPPED.name}.tmp").unlink(missing_ok=True)
