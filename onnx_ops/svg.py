"""SVG primitives for the report's charts: computed in Python, drawn (and escaped) by the Jinja template."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["WIDTH", "Chart", "Circle", "Rect", "Text", "nice_step", "nice_ticks", "tick_text"]

WIDTH = 1000  # viewBox width; the SVG itself scales to 100% of its container


@dataclasses.dataclass(frozen=True)
class Rect:
    """One SVG rect; tip becomes a <title> tooltip."""

    x: float
    y: float
    w: float
    h: float
    cls: str
    tip: str = ""


@dataclasses.dataclass(frozen=True)
class Text:
    """One SVG text; tip becomes a <title> tooltip (used for the full name of a truncated label)."""

    x: float
    y: float
    text: str
    cls: str = ""
    anchor: str = "start"
    tip: str = ""


@dataclasses.dataclass(frozen=True)
class Circle:
    """One SVG circle (a scatter point); tip becomes a <title> tooltip."""

    x: float
    y: float
    r: float
    cls: str
    tip: str = ""


@dataclasses.dataclass
class Chart:
    """An SVG chart as primitives, drawn by the template's `svg` macro."""

    label: str
    height: float
    rects: list[Rect] = dataclasses.field(default_factory=list)
    texts: list[Text] = dataclasses.field(default_factory=list)
    lines: list[tuple[float, float, float, float]] = dataclasses.field(default_factory=list)
    circles: list[Circle] = dataclasses.field(default_factory=list)
    polylines: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (points "x,y x,y", css class)
    note: str = ""
    width: int = WIDTH


def nice_step(span: float, most: int = 10) -> float:
    """A 1-2-5 tick step giving about 4 to `most` ticks over `span`."""
    if not span > 0 or not math.isfinite(span):
        return 1.0
    base = 10.0 ** math.floor(math.log10(span / 4))
    return next(base * m for m in (1, 2, 5, 10) if span / (base * m) <= most)


def nice_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Ticks at round values (multiples of a 1-2-5 step) covering [lo, hi].

    The first is at or below lo, the last at or above hi; there are at most `most` + 1 of them.
    """
    if not hi > lo:
        pad = (abs(lo) or 1.0) * 0.05
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, most - 1)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [_round(k * step, step) for k in range(first, last + 1)]


def tick_text(value: float, step: float) -> str:
    """A tick value with as many decimals as its step needs (0.9995, not 0.99949999)."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-6)) if step > 0 else 0  # 0.0999999 is a step of 0.1
    return f"{value:.{decimals}f}"


def _round(value: float, step: float) -> float:
    decimals = max(0, -math.floor(math.log10(step) + 1e-6)) + 1
    return round(value, decimals) + 0.0  # + 0.0: no "-0.0"
