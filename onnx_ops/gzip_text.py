"""How the gzip figure reads on a page: marked "~" and explained where it is an estimate (see onnx_ops.gzip_size).

The HTML report and the service's job page both show it; the command line's summary says "estimated from
samples" on its own line.
"""

from __future__ import annotations

from collections.abc import Callable

from onnx_ops import gzip_size
from onnx_ops.report import ModelStats

__all__ = ["APPROX", "approx", "estimate_note", "gzip_detail", "gzip_text"]

APPROX = "~"


def estimate_note(*stats: ModelStats) -> str:
    """Why a gzip figure is approximate, when any of `stats` has an estimated one; else ''."""
    if not any(s.gzip_estimated for s in stats):
        return ""
    exact = gzip_size.EXACT_BYTES
    first = f"{exact >> 20} MiB" if exact % (1 << 20) == 0 else f"{exact:,} bytes"
    return (
        f"Gzip size estimated (marked {APPROX}): past the first {first} only evenly spaced samples "
        "are compressed and the rest is counted at their ratio."
    )


def approx(text: str, estimated: bool) -> str:
    """`text`, marked approximate when `estimated`."""
    return f"{APPROX}{text}" if estimated else text


def gzip_text(stats: ModelStats, fmt: Callable[[float], str]) -> str:
    """One model's gzip bytes, formatted by `fmt`, marked when estimated."""
    return approx(fmt(stats.gzip_bytes), stats.gzip_estimated)


def gzip_detail(before: ModelStats, after: ModelStats, fmt: Callable[[float], str]) -> str:
    """'before → after' gzip bytes, with ' (estimated)' when either is."""
    text = f"{gzip_text(before, fmt)} → {gzip_text(after, fmt)}"
    return f"{text} (estimated)" if before.gzip_estimated or after.gzip_estimated else text
