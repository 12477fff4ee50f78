"""Progress of one compression: each part of the work reports within its own share of the whole.

The library reports through one callback, ``progress(stage, fraction)``: ``stage`` says what is being done in
words, ``fraction`` is the share of the whole job done, in [0, 1], and never goes down. Work with a countable
total (calibration batches, evaluation samples, steps) ends its stage text with ``done/total`` (see
``count_of``), so a front end can show a rate and a time left for that stage.

A ``Tracker`` maps a part of the work onto a slice of the whole: the pipeline gives each step a slice, a step
gives its calibration a slice of its own, and updates are throttled so that a callback which writes a file is
not called thousands of times a second. ``CalibrationReader`` counts the batches ONNX Runtime's calibrator
takes, which is how static quantization reports its progress.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Sequence

from onnx_ops.feeds import Feed

__all__ = ["CalibrationReader", "Progress", "Tracker", "count_of"]

Progress = Callable[[str, float], None]

_COUNT = re.compile(r"\s(\d+)/(\d+)$")
_MIN_INTERVAL_S = 0.25  # counted updates closer together than this are dropped (the first and last never are)


def count_of(stage: str) -> tuple[str, int, int] | None:
    """The (stage without its count, done, total) of a counted stage text such as "calibration 3/50", or None."""
    match = _COUNT.search(stage)
    if match is None:
        return None
    return stage[: match.start()], int(match.group(1)), int(match.group(2))


class _Sink:
    """The callback shared by every tracker of one job, with the last update it was given."""

    def __init__(self, callback: Progress | None) -> None:
        self.callback = callback
        self.fraction = 0.0
        self.stage = ""
        self.sent_at = -1.0

    def send(self, stage: str, fraction: float, *, throttle: bool) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if throttle and now - self.sent_at < _MIN_INTERVAL_S:
            return
        self.fraction = max(self.fraction, min(fraction, 1.0))
        self.stage, self.sent_at = stage, now
        self.callback(stage, self.fraction)


class Tracker:
    """Reports the progress of one part of a job as a slice [start, end] of the whole job.

    Args:
        callback: Called with (stage, fraction of the whole job); None reports nothing.
        start: Where this part begins, as a fraction of the whole job.
        end: Where it ends.
        prefix: Put before every stage text of this part (e.g. "step 2/3: quantize").
    """

    def __init__(self, callback: Progress | None, start: float = 0.0, end: float = 1.0, prefix: str = "") -> None:
        self._sink = _Sink(callback)
        self.start, self.end, self.prefix = start, end, prefix

    def part(self, start: float, end: float, prefix: str = "") -> Tracker:
        """A tracker for the sub-part [start, end] of this part (fractions of this part), prefixing its stages."""
        return self._child(self._at(start), self._at(end), self._text(prefix))

    def here(self) -> Tracker:
        """A tracker that stays at the job's current fraction and prefixes the current stage.

        For work of unknown length inside a stage (such as a candidate built during a search): its own stages
        still show, and the fraction does not move.
        """
        return self._child(self._sink.fraction, self._sink.fraction, self._sink.stage)

    def _child(self, start: float, end: float, prefix: str) -> Tracker:
        child = copy.copy(self)  # shares the sink: one callback, one fraction that only grows
        child.start, child.end, child.prefix = start, end, prefix
        return child

    def stage(self, text: str, fraction: float = 0.0) -> None:
        """Report a new stage of this part, `fraction` of the way through the part."""
        self._sink.send(self._text(text), self._at(fraction), throttle=False)

    def count(self, text: str, done: int, total: int) -> None:
        """Report `done` of `total` units of countable work (throttled, except the first and the last)."""
        fraction = done / total if total > 0 else 1.0
        self._sink.send(f"{self._text(text)} {done}/{total}", self._at(fraction), throttle=0 < done < total)

    def counter(self, text: str, total: int) -> Callable[[int], None]:
        """A function to call with the count done so far (for a callback handed to other code)."""
        return lambda done: self.count(text, done, total)

    def _at(self, fraction: float) -> float:
        return self.start + (self.end - self.start) * min(max(fraction, 0.0), 1.0)

    def _text(self, text: str) -> str:
        return f"{self.prefix}: {text}" if self.prefix and text else (self.prefix or text)


class CalibrationReader:
    """Hands ONNX Runtime's calibrator (``quantize_static``) one feed per call, and counts the feeds it used.

    ONNX Runtime takes any object with a ``get_next`` method as its ``CalibrationDataReader``.

    Args:
        feeds: The calibration feeds, in the order they are given.
        on_count: Called with the number of feeds the calibrator has finished with, on every call.
    """

    def __init__(self, feeds: Sequence[Feed], on_count: Callable[[int], None] | None = None) -> None:
        self._feeds = list(feeds)
        self._given = 0
        self._on_count = on_count

    def get_next(self) -> Feed | None:
        """The next feed, or None when all were given; the calibrator asks again only after running the last."""
        if self._on_count is not None:
            self._on_count(self._given)
        if self._given >= len(self._feeds):
            return None
        self._given += 1
        return self._feeds[self._given - 1]

    def __len__(self) -> int:
        return len(self._feeds)
