"""The report's gzip figure (gzip -6 of the model's files), exact for small models, estimated for big ones.

Compressing gigabytes of weights at level 6 takes minutes (about 25 MB/s on one core), far more than every
check of the model together. So the first EXACT_BYTES of the stream are compressed whole, and past them only
evenly spaced samples (SAMPLE_BYTES of every STRIDE_BYTES): the rest is counted at the ratio the samples got.
The report says when its figure is such an estimate (ModelStats.gzip_estimated).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["EXACT_BYTES", "SAMPLE_BYTES", "STRIDE_BYTES", "GzipSize", "is_estimate"]

# Module attributes read at each use, so tests can lower them.
EXACT_BYTES = 64 << 20
SAMPLE_BYTES = 1 << 20
STRIDE_BYTES = 32 << 20
_LEVEL = 6
_GZIP = 31  # wbits for the gzip container
_READ = 1 << 24


def is_estimate(size: int) -> bool:
    """Whether the gzip figure of a stream of `size` bytes is an estimate (past EXACT_BYTES)."""
    return size > EXACT_BYTES


class GzipSize:
    """The gzip size of bytes streamed through it: exact up to EXACT_BYTES, then estimated from samples."""

    def __init__(self) -> None:
        self.exact_bytes, self.sample_bytes, self.stride_bytes = EXACT_BYTES, SAMPLE_BYTES, STRIDE_BYTES
        self._exact = zlib.compressobj(_LEVEL, zlib.DEFLATED, _GZIP)
        self._sampled = zlib.compressobj(_LEVEL, zlib.DEFLATED, _GZIP)
        self.size = 0  # bytes seen
        self._exact_packed = 0
        self._sample_in = 0
        self._sample_packed = 0

    def update(self, data: bytes | memoryview) -> None:
        """Count more bytes of the stream."""
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            if self.size < self.exact_bytes:
                n = min(len(view) - pos, self.exact_bytes - self.size)
                self._exact_packed += len(self._exact.compress(view[pos : pos + n]))
            else:
                phase = (self.size - self.exact_bytes) % self.stride_bytes
                if phase < self.sample_bytes:
                    n = min(len(view) - pos, self.sample_bytes - phase)
                    self._sample_packed += len(self._sampled.compress(view[pos : pos + n]))
                    self._sample_in += n
                else:
                    n = min(len(view) - pos, self.stride_bytes - phase)
            pos += n
            self.size += n

    def file(self, path: Path) -> int:
        """Stream a file through; its size."""
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(_READ):
                size += len(chunk)
                self.update(chunk)
        return size

    def passing(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The chunks, each counted as it passes."""
        for chunk in chunks:
            self.update(chunk)
            yield chunk

    @property
    def estimated(self) -> bool:
        """Whether `finish` gives an estimate (the stream went past the exact part)."""
        return self.size > self.exact_bytes

    def finish(self) -> int:
        """The gzip size of the whole stream (estimated past the exact part); call once, at the end."""
        packed = self._exact_packed + len(self._exact.flush())
        if self._sample_in == 0:
            return packed
        sample_packed = self._sample_packed + len(self._sampled.flush())
        rest = self.size - self.exact_bytes
        return packed + round(rest * sample_packed / self._sample_in)
