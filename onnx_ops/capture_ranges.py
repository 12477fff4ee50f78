"""Per-channel activation ranges, one run per feed: the statistics activation smoothing chooses its strength from."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from onnx_ops.feeds import Feed

__all__ = ["ChannelRange", "Runs", "channel_ranges"]


@dataclasses.dataclass
class ChannelRange:
    """Per-channel (last axis) statistics of one tensor: each feed's range, and the mean square over every row.

    Attributes:
        low: [feeds, channels] each feed's lowest value per channel (a run-time quantizer's range is per run).
        high: [feeds, channels] each feed's highest value per channel.
        square_sum: [channels] the sum of squares over every row of every feed.
        rows: The rows counted.
    """

    low: np.ndarray
    high: np.ndarray
    square_sum: np.ndarray
    rows: int = 0

    @property
    def mean_square(self) -> np.ndarray:
        """E[x_j^2] per channel."""
        return self.square_sum / max(self.rows, 1)

    def finite(self) -> bool:
        """True if every statistic is finite (an infinite activation cannot be smoothed or quantized)."""
        return all(np.all(np.isfinite(a)) for a in (self.low, self.high, self.square_sum))


class Runs(Protocol):
    """Anything that runs a model on one feed and returns its outputs by name (a Session, an ORT wrapper)."""

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        """The outputs on one feed."""
        ...


def channel_ranges(session: Runs, names: Sequence[str], feeds: Sequence[Feed]) -> dict[str, ChannelRange]:
    """Each named float tensor's per-channel range in each feed and sum of squares, one run per feed.

    Every row counts (padding rows too: a dynamic quantizer's run-time range sees them). Used to choose
    activation smoothing's strength from statistics instead of trial quantizations.
    """
    lows: dict[str, list[np.ndarray]] = {}
    highs: dict[str, list[np.ndarray]] = {}
    squares: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for feed in feeds:
        outputs = session.run(feed)
        for name in names:
            value = outputs.get(name)
            if value is None or value.dtype.kind != "f" or value.ndim == 0:
                continue
            flat = np.asarray(value, np.float64).reshape(-1, value.shape[-1])
            if name in squares and squares[name].shape != flat.shape[1:]:
                continue
            lows.setdefault(name, []).append(flat.min(axis=0))
            highs.setdefault(name, []).append(flat.max(axis=0))
            squares[name] = squares.get(name, 0.0) + np.einsum("rk,rk->k", flat, flat)
            rows[name] = rows.get(name, 0) + len(flat)
    return {
        name: ChannelRange(np.stack(lows[name]), np.stack(highs[name]), squares[name], rows[name]) for name in squares
    }
