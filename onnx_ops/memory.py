"""Giving freed memory back to the system at the points a job drops a copy of the weights."""

from __future__ import annotations

import ctypes
import gc

__all__ = ["release_memory"]


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def release_memory() -> None:
    """Free what was dropped, now rather than later.

    The IR holds reference cycles (freed only by the collector), and glibc keeps freed heap pages in the process
    unless asked to give them back (they would count against the job's memory).
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
