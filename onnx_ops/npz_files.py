"""Reading a user's .npz data file safely: members and .npy headers checked, and sized, before any array is read."""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from onnx_ops.errors import DataError
from onnx_ops.validate import clean_message, short_name

__all__ = ["read_npz"]

_ZIP_ENCRYPTED = 0x1  # general purpose flag bit 0 of a zip member


def read_npz(path: Path, role: str, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of a user's .npz file (numpy.savez), each member and header checked before it is read.

    Args:
        path: The file.
        role: "calibration" or "evaluation", for the messages.
        max_bytes: The most the arrays may take in memory, from their headers.

    Raises:
        DataError: The file is not such an archive, holds something else, or its arrays are too large.
    """
    # Sizes come from the .npy headers, before any array is decompressed (a zip bomb is refused unread).
    try:
        with zipfile.ZipFile(path) as archive:
            total = 0
            for info in archive.infolist():
                _check_member(info, role)
                with archive.open(info) as member:
                    shape, dtype = _npy_header(member, info.filename, role)
                total += math.prod(shape) * dtype.itemsize
                if total > max_bytes:
                    raise DataError(f"{role} data would take more than {max_bytes} bytes in memory")
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise DataError(f"{role} file is not a valid .npz archive (numpy.savez)") from e
    except ValueError as e:
        raise DataError(f"{role} file cannot be read safely: {clean_message(e)}") from e


def _check_member(info: zipfile.ZipInfo, role: str) -> None:
    """Refuse a member numpy.savez never writes, before it is opened (zipfile raises on some of them)."""
    name = short_name(info.filename)
    if not info.filename.endswith(".npy"):
        raise DataError(f"{role} file holds {name}, which is not a .npy array")
    if info.flag_bits & _ZIP_ENCRYPTED:
        raise DataError(f"{role} file member {name} is encrypted; save the data with numpy.savez")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DataError(
            f"{role} file member {name} uses zip compression method {info.compress_type}; only stored and "
            "deflated members (numpy.savez, numpy.savez_compressed) are read"
        )


def _npy_header(member: IO[bytes], name: str, role: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as e:  # numpy's parser of a crafted header raises ValueError, SyntaxError, TokenError, ...
        raise DataError(f"{role} array {short_name(name)} has an invalid .npy header") from e
    if dtype.hasobject:
        raise DataError(f"{role} array {short_name(name)} holds Python objects (pickles are refused)")
    return shape, dtype
