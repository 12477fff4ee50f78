"""The rows of bench/peers.py, its printed table and its verdicts (ours against the most accurate peer)."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["HEADER", "Row", "line", "verdicts"]


@dataclasses.dataclass
class Row:
    """One compressed model, measured against the fp32 model on the held-out inputs."""

    model: str
    group: str
    tool: str  # "ours" or the peer's name
    setting: str
    size_ratio: float | None = None
    zeros: float | None = None  # share of zeros among the float weights (>= 256 elements)
    cosine_mean: float | None = None  # mean per-sample output cosine (the worst output)
    cosine_min: float | None = None  # the worst sample's
    unchanged: bool = False  # outputs identical to fp32's: nothing was compressed where it matters
    score: float | None = None
    score_fp32: float | None = None
    latency_ratio: float | None = None
    latency_low: float | None = None
    latency_high: float | None = None
    latency_basis: str = ""
    seconds: float | None = None
    error: str | None = None
    note: str = ""

    def accuracy(self) -> tuple[float, float]:
        """What "more accurate" compares: the task score (rounded to 0.01) first, then the mean cosine."""
        return (round(self.score, 2) if self.score is not None else 0.0, round(self.cosine_mean or 0.0, 4))


def verdicts(rows: list[Row]) -> list[dict[str, Any]]:
    """Per model and group: our most accurate setting against the most accurate peer setting that changed the model."""
    out = []
    for model, group in dict.fromkeys((r.model, r.group) for r in rows):
        mine = [r for r in rows if r.model == model and r.group == group and not r.error]
        ours = max((r for r in mine if r.tool == "ours"), key=Row.accuracy, default=None)
        theirs = max((r for r in mine if r.tool != "ours" and not r.unchanged), key=Row.accuracy, default=None)
        out.append(
            {
                "model": model,
                "group": group,
                "ours": ours.setting if ours else None,
                "best_peer": f"{theirs.tool}: {theirs.setting}" if theirs else None,
                "ours_at_least_as_accurate": (ours.accuracy() >= theirs.accuracy()) if ours and theirs else None,
            }
        )
    return out


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEADER = (
    f"{'model':<13} {'group':<12} {'tool':<8} {'setting':<38} {'size':>5} {'zeros':>5} {'cos':>7} {'worst':>7} "
    f"{'score':>6} {'CPU time [95% interval]':>23} {'s':>6}  note"
)


def line(row: Row) -> str:
    """One row of the printed table."""
    latency = "-" if row.latency_ratio is None else (
        f"{row.latency_ratio:.2f} [{row.latency_low:.2f}, {row.latency_high:.2f}]")  # fmt: skip
    note = row.error or "; ".join(filter(None, ["outputs identical to fp32" if row.unchanged else "", row.note]))
    return (
        f"{row.model:<13} {row.group:<12} {row.tool:<8} {row.setting:<38} {_f(row.size_ratio, '.2f'):>5} "
        f"{_f(row.zeros, '.2f'):>5} {_f(row.cosine_mean, '.4f'):>7} {_f(row.cosine_min, '.4f'):>7} "
        f"{_f(row.score, '.1f'):>6} {latency:>23} {_f(row.seconds, '.0f'):>6}  {note}"
    )
