"""Freeing the disk blocks of a byte range of a file that was read and is not needed again (Linux `fallocate`).

A bundle's archive is read once, member after member, and deleted once unpacked: its bytes are freed as each
member is written out (service.bundles), so the archive and its unpacked files are not both on disk whole. The
file keeps its size; a range punched reads back as zeros. Best effort: where the call is missing or the file
system does not support it, nothing is freed and nothing fails.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["open_for_punching", "punch_hole"]

_PUNCH_HOLE, _KEEP_SIZE = 0x02, 0x01  # FALLOC_FL_PUNCH_HOLE, FALLOC_FL_KEEP_SIZE (linux/falloc.h)


def open_for_punching(path: Path) -> int | None:
    """`path` opened for writing (not through a link at its name), only to punch holes in it; None if it cannot be."""
    if _fallocate() is None:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None


def punch_hole(fd: int, start: int, length: int) -> bool:
    """Free the blocks of the `length` bytes at `start` of the file open as `fd`; False when nothing was done."""
    fallocate = _fallocate()
    if fallocate is None or length <= 0:
        return False
    return fallocate(fd, _PUNCH_HOLE | _KEEP_SIZE, start, length) == 0


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function
