"""A bounded sample of aligned activation rows, spread evenly over the feeds (see ``capture.capture_rows``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from onnx_ops.feeds import Feed

__all__ = ["sample_rows"]


def sample_rows(
    rows: Callable[[int, Feed], dict[str, np.ndarray]], feeds: Sequence[Feed], *, max_rows: int = 16384, seed: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """At most ``max_rows`` aligned rows of some tensors, spread evenly over the feeds (see capture_rows).

    Args:
        rows: Feed index and feed -> [rows, features] per tensor name, the same row count for every name.
        feeds: The feeds.
        max_rows: The cap.
        seed: Seed of each feed's random sample of rows.
    """
    per_feed = max(1, -(-max_rows // max(len(feeds), 1)))
    pieces: dict[str, list[np.ndarray]] = {}
    origin: list[np.ndarray] = []
    for index, feed in enumerate(feeds):
        found = rows(index, feed)
        counts = {len(part) for part in found.values()}
        if len(counts) != 1:
            raise ValueError(f"the tensors' rows do not align: {sorted(counts)} rows in one feed")
        count = counts.pop()
        keep = np.random.default_rng([seed, index]).permutation(count)[:per_feed]
        keep.sort()
        for name, part in found.items():
            pieces.setdefault(name, []).append(part[keep].astype(np.float32))
        origin.append(np.full(len(keep), index))
    arrays = {name: np.concatenate(parts) for name, parts in pieces.items()}
    return arrays, np.concatenate(origin) if origin else np.zeros(0, dtype=int)
