"""The command line's view of a compression's progress: a bar on a terminal, plain lines elsewhere.

On a terminal (stderr is a tty) one line is redrawn in place: a bar, the percentage of the job, the time
since the start (redrawn every second), the stage, and for a stage with a countable total
(``calibration batch 12/50``) the time that stage still needs at its rate so far. Log records are written
above the bar. Anywhere else (a pipe, a file, CI) a plain line is written when the stage changes, and for a
counted stage at most every few seconds.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import TextIO

from onnx_ops.progress import count_of

__all__ = ["ProgressDisplay"]

_WIDTH = 24  # characters of the bar
_PLAIN_EVERY_S = 5.0  # a counted stage writes a plain line at most this often
_TAIL = 36  # characters kept at the end of a stage text too long for the terminal
_TICK_S = 1.0  # the bar's clock is redrawn this often while a stage runs without news


class ProgressDisplay:
    """Shows the (stage, fraction) updates of onnx_ops' progress callback on a stream.

    Args:
        stream: Where to write (stderr).
        terminal: Redraw one line with a bar (a terminal), or write plain lines.
    """

    def __init__(self, stream: TextIO, *, terminal: bool) -> None:
        self.stream, self.terminal = stream, terminal
        self.started = time.monotonic()
        self.line = ""
        self._count_start: tuple[str, float, int] | None = None  # (stage, when first seen, done then)
        self._plain: tuple[str, float] = ("", 0.0)  # (stage base of the last plain line, when written)
        self._last: tuple[str, float, str] | None = None  # (stage, fraction, time left) of the last update
        self._lock = threading.Lock()  # the updates, the clock's thread and log records draw in turn
        self._stop = threading.Event()
        self._clock: threading.Thread | None = None

    def __call__(self, stage: str, fraction: float) -> None:
        """Take one update of the library's progress callback."""
        now = time.monotonic()
        counted = count_of(stage)
        base = counted[0] if counted else stage
        left = self._time_left(counted, now)
        if self.terminal:
            with self._lock:
                self._last = (stage, fraction, left)
                self.line = self._bar_line(stage, fraction, left, now)
                self._draw(self.line)
            if self._clock is None:
                self._clock = threading.Thread(target=self._tick, name="progress-clock", daemon=True)
                self._clock.start()
        elif base != self._plain[0] or (counted and now - self._plain[1] >= _PLAIN_EVERY_S):
            self._plain = (base, now)
            self.stream.write(f"[{fraction:4.0%}] {stage}{left}\n")
            self.stream.flush()

    def close(self) -> None:
        """Remove the bar from the terminal (the summary follows on stdout)."""
        self._stop.set()
        if self._clock is not None:
            self._clock.join()
        if self.terminal and self.line:
            self._draw("")
            self.line = ""

    def log_handler(self) -> logging.Handler:
        """A handler that writes log records above the bar instead of through it."""
        return _AboveTheBar(self)

    def _tick(self) -> None:
        """Redraw the bar's clock while a stage runs, so a long stage is seen to be alive."""
        while not self._stop.wait(_TICK_S):
            with self._lock:
                if self._last is not None and self.line:
                    self.line = self._bar_line(*self._last, time.monotonic())
                    self._draw(self.line)

    def _time_left(self, counted: tuple[str, int, int] | None, now: float) -> str:
        if counted is None:
            self._count_start = None
            return ""
        base, done, total = counted
        if self._count_start is None or self._count_start[0] != base or done < self._count_start[2]:
            self._count_start = (base, now, done)
            return ""
        _, since, first = self._count_start
        left = (now - since) / (done - first) * (total - done) if first < done < total else 0.0
        return f", {_duration(left)} left" if left >= 1 else ""

    def _bar_line(self, stage: str, fraction: float, left: str, now: float) -> str:
        filled = round(fraction * _WIDTH)
        head = f"[{'#' * filled}{'-' * (_WIDTH - filled)}] {fraction:4.0%} {_duration(now - self.started)} "
        width = shutil.get_terminal_size((100, 20)).columns - 1
        tail = stage + left
        room = max(width - len(head), _TAIL + 8)
        if len(tail) > room:  # keep the end, where the count moves
            cut = room - _TAIL - 3
            tail = tail[:cut] + "..." + tail[-_TAIL:]
        return head + tail

    def _draw(self, line: str) -> None:
        self.stream.write(f"\r\x1b[2K{line}")  # carriage return, erase the line, write
        self.stream.flush()


class _AboveTheBar(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, display: ProgressDisplay) -> None:
        super().__init__(display.stream)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        if not (self.display.terminal and self.display.line):
            super().emit(record)
            return
        with self.display._lock:
            self.display._draw("")
            super().emit(record)
            self.display._draw(self.display.line)


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds // 60 % 60:02d}"
