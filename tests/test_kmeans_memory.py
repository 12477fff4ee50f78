"""k-means of one weight holds at most a few copies of it, with the same answer a float64 search gives."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from onnx_ops.passes import _kmeans
from onnx_ops.passes._kmeans import kmeans_1d


@pytest.mark.parametrize("pin_zero", [False, True])
def test_kmeans_of_a_weight_allocates_at_most_four_times_it(pin_zero: bool) -> None:
    # Before: a float64 copy for the starting quantiles partitioned into a second one, the prefix sums built
    # twice, a float64 cast of the sorted values in every Lloyd iteration and int64 indices: 7-8x the weight.
    values = np.random.default_rng(0).standard_normal(2_000_000).astype(np.float32)
    tracemalloc.start()
    try:
        kmeans_1d(values, 16, pin_zero=pin_zero)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 4.2 * values.nbytes


def test_float32_cuts_match_the_float64_search_at_every_edge() -> None:
    rng = np.random.default_rng(1)
    ordered = np.sort(np.concatenate([rng.standard_normal(5000), [0.0, 0.0, 1.0, -1.0]]).astype(np.float32))
    exact = ordered[::97].astype(np.float64)  # midpoints that are float32 values themselves
    between = (ordered[1::89].astype(np.float64) + ordered[:-1:89].astype(np.float64)) / 2  # neighbours' midpoints
    nudged = np.nextafter(exact, np.inf)  # just above a float32 value, below the next one
    for midpoints in (exact, between, nudged, np.nextafter(exact, -np.inf)):
        midpoints = np.sort(midpoints)
        assert np.array_equal(_kmeans._cuts(ordered, midpoints), np.searchsorted(ordered, midpoints))


def test_indices_assigned_a_chunk_at_a_time_match_one_search(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kmeans, "_CHUNK", 1000)
    values = np.random.default_rng(2).laplace(size=12_345).astype(np.float32)
    found = kmeans_1d(values, 8)
    midpoints = (found.codebook[:-1] + found.codebook[1:]) / 2
    assert np.array_equal(found.indices, np.searchsorted(midpoints, values, side="right").astype(np.uint8))
    few = np.repeat(np.float32([0.5, -1.0, 2.0]), 1500)  # fewer distinct values than k: each its own centroid
    assert np.array_equal(kmeans_1d(few, 8).indices, np.searchsorted(np.float32([-1.0, 0.5, 2.0]), few))
