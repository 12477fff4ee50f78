"""Charts of the automatic search for the HTML report: per-layer sensitivity bars and Pareto scatters.

Like the other charts, these are lists of SVG primitives; the template draws and escapes them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from onnx_ops.auto_budget import describe, judged_cosine
from onnx_ops.report import AutoCandidate, AutoResult, LayerSensitivity
from onnx_ops.svg import WIDTH, Chart, Circle, Rect, Text, nice_ticks, tick_text

__all__ = ["AutoCharts", "auto_charts"]

_LABEL_W, _ROW_H, _MAX_ROWS, _NAME_CHARS = 230, 22, 40, 28
_LOSS_FLOOR = 1e-7  # losses below this draw as a stub: float32 noise, not a measurable change
_PLOT = (80.0, 20.0, WIDTH - 40.0, 340.0)  # left, top, right, bottom of a scatter's plot area


@dataclasses.dataclass(frozen=True)
class AutoCharts:
    """The charts of one search."""

    sensitivity: list[Chart]
    pareto: list[Chart]


def auto_charts(auto: AutoResult) -> AutoCharts:
    """Sensitivity bar charts (one per pass family) and Pareto scatters of the measured candidates."""
    families = sorted({s.family for s in auto.sensitivity})
    bars = [_sensitivity_chart([s for s in auto.sensitivity if s.family == f], f) for f in families]
    measured = [c for c in auto.candidates if c.status == "measured"]
    accuracy = any(c.accuracy_drop is not None for c in measured) and auto.budget.startswith("task accuracy")
    pareto = [_pareto_chart(measured, axis, accuracy, auto) for axis in ("size", "latency")] if measured else []
    return AutoCharts(bars, pareto)


def _short(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else "…" + name[-(_NAME_CHARS - 1) :]


def _sensitivity_chart(items: Sequence[LayerSensitivity], family: str) -> Chart:
    rows = sorted(items, key=lambda s: s.loss, reverse=True)[:_MAX_ROWS]
    top = max((s.loss for s in rows), default=0.0)
    hi = math.log10(max(top, _LOSS_FLOOR * 10))
    lo = math.log10(_LOSS_FLOOR)
    bar_w = WIDTH - _LABEL_W - 190
    chart = Chart(label=f"Sensitivity per layer ({family}): 1 - output cosine, log scale", height=len(rows) * _ROW_H)
    for i, item in enumerate(rows):
        y = i * _ROW_H
        frac = (math.log10(max(item.loss, _LOSS_FLOOR)) - lo) / (hi - lo)
        w = max(frac * bar_w, 1.0)
        value = f"{item.loss:.2e}" + (f", {item.accuracy_drop:+.2f} pts" if item.accuracy_drop is not None else "")
        tip = f"{item.name} ({item.op_type}, {item.parameters} weights): loss {value}"
        chart.texts.append(Text(_LABEL_W - 10, y + 15, _short(item.name), "label", "end", tip))
        chart.rects.append(Rect(_LABEL_W, y + 3, bar_w, _ROW_H - 6, "track"))
        chart.rects.append(Rect(_LABEL_W, y + 3, w, _ROW_H - 6, "sensitivity", tip))
        chart.texts.append(Text(_LABEL_W + bar_w + 6, y + 15, value, "value"))
    more = f" Showing the {_MAX_ROWS} most sensitive of {len(items)}." if len(items) > _MAX_ROWS else ""
    chart.note = (
        f"Each bar: how far the output moves when only this layer is compressed ({family}); longer is more "
        f"sensitive. Log scale from {_LOSS_FLOOR:g}.{more}"
    )
    return chart


def _pareto_chart(cands: Sequence[AutoCandidate], axis: str, accuracy: bool, auto: AutoResult) -> Chart:
    left, top, right, bottom = _PLOT
    chosen = auto.chosen
    line = None if auto.threshold is None else (-auto.threshold if accuracy else auto.threshold)

    def xval(c: AutoCandidate) -> float:
        return (c.size_ratio if axis == "size" else c.latency_ratio) or 1.0

    def yval(c: AutoCandidate) -> float:  # higher is better on screen
        return -(c.accuracy_drop or 0.0) if accuracy else judged_cosine(c)

    xs, ys = [xval(c) for c in cands] + [1.0], [yval(c) for c in cands] + [0.0 if accuracy else 1.0]
    ys += [] if line is None else [line]
    x_ticks = nice_ticks(0.0, max(xs) * 1.02)
    y_ticks = nice_ticks(min(ys), max(ys))
    if not accuracy:  # no cosine above 1: the top edge is "identical outputs"
        y_ticks = [t for t in y_ticks if t <= 1.0]
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    sx: Callable[[float], float] = lambda v: left + (v - x_lo) / (x_hi - x_lo) * (right - left)  # noqa: E731
    sy: Callable[[float], float] = lambda v: bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)  # noqa: E731
    what = "bytes on disk" if axis == "size" else "latency (CPU time, one thread)"
    quality = "task accuracy change (points)" if accuracy else "judged cosine (5th-pct sample, top-1/exact)"
    chart = Chart(label=f"Candidates: {what} ratio against {quality}", height=bottom + 50)
    chart.lines += [(left, top, left, bottom), (left, bottom, right, bottom), (sx(1.0), top, sx(1.0), bottom)]
    chart.texts.append(Text(sx(1.0) + 4, top + 12, "original (1.0)", "tick"))
    if line is not None:
        chart.lines.append((left, sy(line), right, sy(line)))
        chart.texts.append(Text(right, sy(line) - 4, f"budget: {auto.budget}", "tick", "end"))
    for xv in x_ticks:
        chart.lines.append((sx(xv), bottom, sx(xv), bottom + 5))
        chart.texts.append(Text(sx(xv), bottom + 18, tick_text(xv, x_ticks[1] - x_ticks[0]), "tick", "middle"))
    for yv in y_ticks:
        chart.lines.append((left - 5, sy(yv), left, sy(yv)))
        chart.texts.append(Text(left - 8, sy(yv) + 4, tick_text(yv, y_ticks[1] - y_ticks[0]), "tick", "end"))
    chart.texts.append(
        Text((left + right) / 2, bottom + 40, f"{what}, candidate / original (left is better)", "axis", "middle")
    )
    chart.texts.append(Text(left, top - 6, f"{quality} (up is better)", "axis"))
    front = _front(cands, xval, yval)
    chart.polylines.append((" ".join(f"{sx(xval(c)):.1f},{sy(yval(c)):.1f}" for c in front), "front"))
    for c in sorted(cands, key=lambda c: c.index == chosen):
        cls = "chosen" if c.index == chosen else ("meets" if c.meets_budget else "misses")
        tip = (
            f"#{c.index} {c.label}: size {c.size_ratio or 0:.3f}, latency {c.latency_ratio or 0:.3f}, "
            + describe(c)
            + (" (beaten on size and accuracy by the default plan)" if c.dominated_by is not None else "")
        )
        chart.circles.append(Circle(sx(xval(c)), sy(yval(c)), 8 if cls == "chosen" else 5, cls, tip))
    chart.note = (
        "Every measured candidate: filled green within the budget, red outside it, the chosen one large and "
        "outlined; the line joins the Pareto front (no other candidate is both smaller/faster and more accurate)."
    )
    return chart


def _front(
    cands: Sequence[AutoCandidate], xval: Callable[[AutoCandidate], float], yval: Callable[[AutoCandidate], float]
) -> list[AutoCandidate]:
    front: list[AutoCandidate] = []
    for c in sorted(cands, key=lambda c: (xval(c), -yval(c))):
        if not front or yval(c) > yval(front[-1]):
            front.append(c)
    return front
