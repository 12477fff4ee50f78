"""What the job page and the jobs list show of a job: headline figures, progress, result or failure in a line."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

from pydantic import ValidationError

from onnx_ops.gzip_text import approx, estimate_note, gzip_detail
from onnx_ops.html_report import fold_ratio, latency_headline
from onnx_ops.report import MAX_REPORT_BYTES, Report
from service.job_files import read_capped
from service.jobs import Job, JobState, JobStore

__all__ = ["Figure", "Outcome", "display_fraction", "figures", "fmt_bytes", "outcome", "read_report", "stage_text"]

OUTCOME_CHARS = 160  # a failure message in the jobs list is cut here (the job page shows it whole)
_REPORT_READ_CAP = 8 << 20  # a report.json larger than this is not read for the jobs list


def fmt_bytes(n: float) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    power = min(int(math.log(abs(n), 1024)), 3)
    return f"{n / 1024**power:.3g} {('KiB', 'MiB', 'GiB')[power - 1]}"


@dataclasses.dataclass(frozen=True)
class Figure:
    """One headline figure of a finished job (`note`: shown on hover, why the figure is approximate)."""

    key: str
    title: str
    value: str
    detail: str
    tone: str = "same"
    note: str = ""


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x * 100:.1f}%"


def figures(report: Report) -> list[Figure]:
    """The figures a person deciding whether to use the result looks at first."""
    b, a = report.before, report.after
    size, size_tone = fold_ratio(b.size_bytes, a.size_bytes, "smaller", "larger")
    gz, gz_tone = fold_ratio(b.gzip_bytes, a.gzip_bytes, "smaller", "larger")
    gz_note = estimate_note(b, a)
    _, lat, lat_detail, lat_tone = latency_headline(report)
    items = [
        Figure("size", "Size on disk", size, f"{fmt_bytes(b.size_bytes)} → {fmt_bytes(a.size_bytes)}", size_tone),
        Figure("gzip", "Size zipped", approx(gz, bool(gz_note)), gzip_detail(b, a, fmt_bytes), gz_tone, gz_note),
        Figure("latency", "Latency", lat, lat_detail, lat_tone),
        Figure("parameters", "Parameters", f"{b.parameters:,} → {a.parameters:,}", "weights and constants"),
        Figure("zeros", "Zero weights", f"{_pct(b.zero_fraction)} → {_pct(a.zero_fraction)}", "of all parameters"),
    ]
    outs = report.agreement.outputs
    if outs:
        cos = min(o.cosine for o in outs)
        top1 = [o.top1_agreement for o in outs if o.top1_agreement is not None]
        detail = "1.0 means identical outputs" + (f"; same top-1 class {_pct(min(top1))}" if top1 else "")
        items.append(Figure("cosine", "Output similarity", f"{cos:.5g}", detail, "bad" if cos < 0.99 else "same"))
    acc = report.agreement.accuracy
    if acc is not None:
        tone = "bad" if acc.drop_points > 1 else "same"
        detail = f"on {acc.samples} labelled samples"
        items.append(Figure("accuracy", "Task accuracy", f"{_pct(acc.before)} → {_pct(acc.after)}", detail, tone))
    return items


def read_report(store: JobStore, job: Job) -> Report | None:
    """A succeeded job's report, or None (not succeeded, or its files deleted or expired)."""
    if job.state != JobState.succeeded:
        return None
    try:
        # Capped and never through a link (the job's process wrote it); the job process bounds what it writes.
        data = read_capped(store.path(job.id), "report.json", 2 * MAX_REPORT_BYTES)
        return Report.model_validate_json(data)
    except (OSError, ValidationError):
        return None


def display_fraction(state: str, fraction: float) -> float:
    """Overall progress for the bar (the job process reports fractions of the whole job that only grow)."""
    if state in ("succeeded", "failed"):
        return 1.0
    if state == "queued":
        return 0.0
    return min(max(fraction, 0.0), 1.0)


_STAGE_TEXT = {
    "validate": "checking the model",
    "evaluate": "measuring both models (latency and accuracy)",
    "measured": "writing the results",
    "writing results": "writing the results",
    "done": "finishing",
}


def stage_text(state: str, stage: str | None) -> str:
    """What the job is doing, in words (app.js has the same table for updates)."""
    if state == "queued":
        return "waiting for a worker"
    return _STAGE_TEXT.get(stage or "", stage or "starting")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A job's result or failure in one line of the jobs list.

    Attributes:
        text: The line (at most OUTCOME_CHARS characters of a failure message).
        tone: good, bad or same (for colour).
        title: The longer text shown on hover (the whole bounded failure message).
    """

    text: str
    tone: str = "same"
    title: str = ""


@functools.lru_cache(maxsize=512)
def _sizes(path: Path, stamp: tuple[int, int]) -> tuple[int, int] | None:
    """(before, after) bytes on disk from a report.json; cached per file version (`stamp`: mtime, size)."""
    if stamp[1] > _REPORT_READ_CAP:
        return None
    try:
        data = json.loads(read_capped(path.parent, path.name, _REPORT_READ_CAP))  # not through a link, nor a FIFO
        return int(data["before"]["size_bytes"]), int(data["after"]["size_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def outcome(store: JobStore, job: Job, stage: str | None, progress: float) -> Outcome:
    """The result (size ratio) of a succeeded job, the failure of a failed one, or where a live one is."""
    if job.state == JobState.failed:
        if job.error is None:
            return Outcome("failed", "bad")
        full = f"{job.error.code}: {job.error.message}"
        return Outcome(_cut(full, OUTCOME_CHARS), "bad", _cut(full, 4 * OUTCOME_CHARS))
    if job.state == JobState.succeeded:
        path = store.path(job.id) / "report.json"
        try:
            st = path.stat()
        except OSError:
            return Outcome("results deleted or expired")
        sizes = _sizes(path, (st.st_mtime_ns, st.st_size))
        if sizes is None:
            return Outcome("see the report")
        text, tone = fold_ratio(sizes[0], sizes[1], "smaller", "larger")
        return Outcome(f"{text} ({fmt_bytes(sizes[0])} → {fmt_bytes(sizes[1])})", tone)
    if job.state == JobState.running:
        return Outcome(f"{display_fraction('running', progress) * 100:.0f}% · {stage_text('running', stage)}")
    return Outcome(stage_text("queued", None))
