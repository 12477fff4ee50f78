"""Number and name text of the HTML report: sizes, counts, percentages, before/after ratios, long names."""

from __future__ import annotations

import math
import re

import markupsafe

__all__ = ["fmt_bytes", "fmt_count", "fmt_db", "fmt_num", "fmt_pct", "fold_ratio", "short_tail", "sig", "wbr"]

_NAME_CHARS = 28


def sig(x: float) -> str:
    """Three significant digits without exponent notation (`.3g` turns 1234 into 1.23e+03)."""
    if not math.isfinite(x) or x == 0:
        return fmt_num(x)
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def fmt_bytes(n: float) -> str:
    """Bytes in B, KiB, MiB or GiB (three significant digits)."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    power = min(int(math.log(abs(n), 1024) + 1e-9), 3)
    return f"{sig(n / 1024**power)} {('KiB', 'MiB', 'GiB')[power - 1]}"


def fmt_count(n: float) -> str:
    """A count with a k, M or G suffix (three significant digits)."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{sig(n / div)}{unit}"
    return f"{n:.0f}"


def fmt_num(x: float | None, digits: int = 4) -> str:
    """A number to `digits` significant digits; n/a for None or nan, a sign and the infinity sign for infinities."""
    # Non-finite values are legitimate here (SNR of identical outputs is inf); never print "inf" bare.
    if x is None or math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.{digits}g}"


def fmt_db(x: float) -> str:
    """Decibels; infinity (the SNR of identical outputs) reads as identical."""
    return "∞ (identical)" if x == math.inf else f"{fmt_num(x, 3)} dB"


def fmt_pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage; n/a when missing or not finite."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x * 100:.{digits}f}%"


def fold_ratio(before: float, after: float, less: str, more: str, noise: float = 0.005) -> tuple[str, str]:
    """'3.9x smaller' style text of a before/after pair, and a tone: good, bad or same.

    Changes within `noise` (relative) read as no change: latency uses 5%, what interleaved timing on a
    shared host cannot tell apart.
    """
    if not (before > 0 and after > 0 and math.isfinite(before / after)):
        return "n/a", "same"
    r = before / after
    if abs(r - 1) < noise:
        return ("no change" if noise < 0.01 else f"about the same ({r:.2f}x)"), "same"
    # One decimal hides small changes (1.04 -> "1.0x"), so use two below 1.1x.
    x = max(r, 1 / r)
    text = f"{x:.2f}x" if x < 1.1 else f"{x:.1f}x"
    return (f"{text} {less}", "good") if r > 1 else (f"{text} {more}", "bad")


def wbr(name: str) -> markupsafe.Markup:
    """Escape a name and allow line breaks after / . _ so long node names wrap at their separators."""
    return markupsafe.Markup("<wbr>").join(markupsafe.escape(p) for p in re.split(r"(?<=[/._:])", name))


def short_tail(name: str, limit: int = _NAME_CHARS) -> str:
    """Keep the tail: ONNX names share a path prefix and differ at the end (`/model/layers.11/mlp/fc1/MatMul`)."""
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]
