"""SVG primitives for the report's charts: computed in Python, drawn (and escaped) by the Jinja template."""

from __future__ import annotations

import dataclasses

__all__ = ["WIDTH", "Chart", "Circle", "Rect", "Text"]

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
