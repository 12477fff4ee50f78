"""Bundles (zip and tar archives of a model and its data files) for tests, well-formed and hostile."""

from __future__ import annotations

import io
import stat
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

import onnx

import models


def external_mlp(name: str = "net.onnx") -> dict[str, bytes]:
    """models.mlp() saved as onnx saves it with external data: {file name: bytes} of the model and its data."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(
            models.mlp(),
            Path(tmp) / name,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=name + ".data",
            size_threshold=0,
        )
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def with_location(model: bytes, location: str) -> bytes:
    """The model with every external reference moved to `location` (offsets kept)."""
    proto = onnx.ModelProto.FromString(model)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return proto.SerializeToString()


def zip_bundle(
    files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED, modes: dict[str, int] | None = None, flags: int = 0
) -> bytes:
    """A zip of these members (in order; a name may repeat via a list of pairs), with optional Unix modes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            info.external_attr = (modes or {}).get(name, stat.S_IFREG | 0o644) << 16
            archive.writestr(info, data)
    out = bytearray(buffer.getvalue())
    if flags:  # zipfile writes its own flags: set these in every local and central header afterwards
        for signature, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            start = out.find(signature)
            while start >= 0:
                out[start + at] |= flags
                start = out.find(signature, start + 4)
    return bytes(out)


def zip_twice(name: str, data: bytes) -> bytes:
    """A zip holding two members of the same name."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": the point
        archive.writestr(name, data)
        archive.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def tar_bundle(files: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """An uncompressed tar of these regular files, plus `links`: name -> (tar type, link target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:", format=tarfile.PAX_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            archive.addfile(info)
    return buffer.getvalue()
