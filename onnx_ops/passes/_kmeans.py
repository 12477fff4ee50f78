"""One-dimensional k-means of a weight's values: exact Lloyd iterations on the sorted values, in numpy.

In one dimension every cluster of Lloyd's algorithm is a contiguous run of the sorted values, cut at the midpoints
between neighbouring centroids. So the values are sorted once (n log n), and each iteration finds the cuts by
binary search and the cluster means from prefix sums: O(k log n) per iteration, whatever the weight's size. The
final assignment is one binary search per value among the k - 1 midpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import numpy as np

__all__ = ["Clusters", "kmeans_1d"]

_PLUS_SAMPLE = 20_000  # kmeans++ draws its centroids from this many values of the weight
_STILL = 1e-7  # Lloyd stops when no centroid moves by more than this fraction of the values' range
_CHUNK = 1 << 20  # values assigned to their centroid at a time


@dataclasses.dataclass(frozen=True)
class Clusters:
    """The codebook and each value's index into it.

    Attributes:
        codebook: Centroids, ascending, float32 (at most k; fewer when the values have fewer distinct values).
        indices: Index of each value's centroid, uint8, in the values' (flattened) order.
        iterations: Lloyd iterations run.
    """

    codebook: np.ndarray
    indices: np.ndarray
    iterations: int


def kmeans_1d(
    values: np.ndarray,
    k: int,
    *,
    init: Literal["quantile", "kmeans++"] = "quantile",
    iterations: int = 12,
    pin_zero: bool = False,
    seed: int = 0,
) -> Clusters:
    """Cluster the values of an array into at most k (<= 256) centroids.

    Args:
        values: Any float array (flattened).
        k: Most centroids.
        init: Starting centroids: evenly spaced quantiles, or kmeans++ on a sample of the values.
        iterations: Most Lloyd iterations.
        pin_zero: Keep 0.0 as a centroid that never moves (zeros stay exact zeros).
        seed: Seed of kmeans++'s sampling.
    """
    if not 2 <= k <= 256:
        raise ValueError(f"k must be 2 to 256, got {k}")
    flat = np.asarray(values, np.float32).ravel()
    ordered = np.sort(flat)
    if np.count_nonzero(np.diff(ordered)) < k:  # few distinct values: each is its own exact centroid
        codebook = np.unique(ordered).astype(np.float32)
        return Clusters(codebook, _assign(np.searchsorted, codebook, flat), 0)
    centroids = _start(ordered, k, init, pin_zero, seed)  # before the prefix sums: its float64 copy is gone
    prefix = np.empty(ordered.size + 1, np.float64)  # the running sums, accumulated in place (no float64 temporary)
    prefix[0] = 0.0
    prefix[1:] = ordered
    np.cumsum(prefix[1:], out=prefix[1:])
    pinned = np.flatnonzero(centroids == 0.0) if pin_zero else np.empty(0, np.intp)
    tolerance = _STILL * float(ordered[-1] - ordered[0])
    done = 0
    for done in range(1, iterations + 1):  # noqa: B007 - the count is reported
        cuts = _cuts(ordered, (centroids[:-1] + centroids[1:]) / 2)
        starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [ordered.size]])
        counts = ends - starts
        means = (prefix[ends] - prefix[starts]) / np.maximum(counts, 1)
        moved = np.where(counts > 0, means, centroids)
        moved[pinned] = 0.0
        moved = np.sort(moved)
        shift = float(np.abs(moved - centroids).max())
        centroids = moved
        if shift <= tolerance:
            break
    del ordered, prefix
    codebook = np.unique(centroids.astype(np.float32))
    midpoints = (codebook[:-1] + codebook[1:]) / 2
    return Clusters(codebook, _assign(_right_of, midpoints, flat), done)


def _cuts(ordered: np.ndarray, midpoints: np.ndarray) -> np.ndarray:
    """How many float32 values lie below each float64 midpoint, searched as float32 (numpy would cast every value).

    For float32 values v, v < m exactly when v < t, t the smallest float32 at or above m.
    """
    above = midpoints.astype(np.float32)
    low = above < midpoints
    above[low] = np.nextafter(above[low], np.float32(np.inf))
    return np.searchsorted(ordered, above)


def _right_of(cuts: np.ndarray, part: np.ndarray) -> np.ndarray:
    """How many cuts lie at or below each value: its centroid's index."""
    return np.searchsorted(cuts, part, side="right")


def _assign(search: Callable[[np.ndarray, np.ndarray], np.ndarray], cuts: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Each value's uint8 index from `search(cuts, values)`, a chunk at a time (its int64 result is 8 bytes a value)."""
    indices = np.empty(flat.size, np.uint8)
    for start in range(0, flat.size, _CHUNK):
        indices[start : start + _CHUNK] = search(cuts, flat[start : start + _CHUNK])
    return indices


def _start(ordered: np.ndarray, k: int, init: str, pin_zero: bool, seed: int) -> np.ndarray:
    """The k starting centroids (float64, ascending; 0.0 among them when pin_zero)."""
    pool = ordered[ordered != 0] if pin_zero else ordered
    wanted = k - 1 if pin_zero else k
    if init == "kmeans++":
        chosen = _plus_plus(pool, wanted, seed, [0.0] if pin_zero else [])
    else:
        # the float64 copy is partitioned in place (the same order statistics, without a second copy)
        chosen = np.quantile(pool.astype(np.float64), (np.arange(wanted) + 0.5) / wanted, overwrite_input=True)
    start = np.concatenate([chosen, [0.0]]) if pin_zero else chosen
    return np.sort(np.asarray(start, np.float64))


def _plus_plus(pool: np.ndarray, wanted: int, seed: int, fixed: list[float]) -> np.ndarray:
    """kmeans++ seeding on a sample of the values: each next centroid drawn with probability ~ squared distance."""
    rng = np.random.default_rng(seed)
    sample = pool if pool.size <= _PLUS_SAMPLE else rng.choice(pool, _PLUS_SAMPLE, replace=False)
    sample = sample.astype(np.float64)
    chosen: list[float] = []
    if fixed:
        distance = (sample - fixed[0]) ** 2
    else:
        chosen.append(float(sample[rng.integers(sample.size)]))
        distance = (sample - chosen[0]) ** 2
    while len(chosen) < wanted:
        total = float(distance.sum())
        if total <= 0.0:  # every sampled value is a centroid already
            break
        pick = float(sample[rng.choice(sample.size, p=distance / total)])
        chosen.append(pick)
        distance = np.minimum(distance, (sample - pick) ** 2)
    return np.asarray(chosen, np.float64)
