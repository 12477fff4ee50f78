"""The numerics of low-rank factorization: decompositions of a matrix, rank rules, and balanced factors.

A :class:`Spectrum` is a matrix's singular values with a way to build rank-r factors ``A[K,r] @ B[r,N]``.
``gram`` (the default) takes the eigen-decomposition of the smaller Gram matrix (``W^T W`` or ``W W^T``, in
float64): its eigenvalues are the squared singular values, so energies are exact, and for a 768x3072 matrix it
costs about a fifth of LAPACK's gesdd. ``exact`` is gesdd; ``randomized`` a Gaussian range finder with power
iterations (Halko et al. 2011), truncated, so only the sketched part of the spectrum is known.

Ranks come from a per-matrix rule or from :func:`allocate`, one threshold over every matrix's error per
parameter, so a global parameter target is met with the least total relative error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import numpy as np

from onnx_ops.passes._base import sum_squares

__all__ = [
    "Spectrum",
    "allocate",
    "balance",
    "blas_threads",
    "break_even",
    "decompose",
    "energy_rank",
    "error_rank",
    "relative",
    "residual",
]

_OVERSAMPLE = 10
_BLOCK_BYTES = 16 << 20  # float64 blocks of a weight's rows: the temporaries stay small beside the weight
_POWER_ITERATIONS = 2


@dataclasses.dataclass
class Spectrum:
    """Singular values of a matrix (descending) and the data to build its truncated factors.

    Attributes:
        s: Singular values, descending; all of them, or only the sketched ones (``complete`` False).
        total: Sum of all squared singular values (||W||_F^2), known even when ``s`` is partial.
        algorithm: gram, exact or randomized.
        complete: Whether ``s`` is the whole spectrum.
    """

    s: np.ndarray
    total: float
    algorithm: str
    complete: bool
    _w: np.ndarray
    _basis: np.ndarray  # gram: eigenvectors; exact/randomized: U
    _vt: np.ndarray | None = None
    _tall: bool = True

    def tail(self, r: int) -> float:
        """Squared Frobenius norm of W minus its best rank-r approximation (from the known spectrum)."""
        return max(self.total - float(np.sum(np.square(self.s[:r], dtype=np.float64))), 0.0)

    def factors(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Rank-r factors A [K, r], B [r, N] of W, with the singular values split evenly (sqrt) between them."""
        r = min(r, len(self.s))
        s = self.s[:r]
        root = np.sqrt(s)
        inv = np.divide(1.0, root, out=np.zeros_like(root), where=s > s[:1] * 1e-12) if r else root
        if self._vt is not None:  # exact / randomized: U s V^T
            return self._basis[:, :r] * root, root[:, None] * self._vt[:r]
        vectors = self._basis[:, :r]
        if self._tall:  # eigenvectors of W^T W are V: U s = W V
            return _product(self._w, vectors) * inv, (vectors * root).T
        # eigenvectors of W W^T are U: s V^T = U^T W
        return vectors * root, inv[:, None] * _product(self._w.T, vectors).T

    def light(self) -> Spectrum:
        """The singular values alone (ranks can be chosen from them; factors cannot be built)."""
        return dataclasses.replace(self, _w=np.empty((0, 0)), _basis=np.empty((0, 0)), _vt=None)


def decompose(w: np.ndarray, algorithm: str = "gram", sketch: int | None = None) -> Spectrum:
    """The spectrum of w by gram (float64 Gram eigen-decomposition), exact (gesdd) or randomized (sketch rank).

    Raises:
        numpy.linalg.LinAlgError: When LAPACK does not converge (very rare).
    """
    total = sum_squares(w)
    if algorithm == "randomized":
        u, s, vt = _randomized(np.asarray(w), sketch or min(w.shape))
        return Spectrum(s.astype(np.float64), total, "randomized", len(s) == min(w.shape), w, u, vt)
    if algorithm == "exact":
        u, s, vt = _exact(np.asarray(w))
        return Spectrum(s.astype(np.float64), total, "exact", True, w, u, vt)
    tall = w.shape[0] >= w.shape[1]
    gram = _gram(w if tall else w.T)
    values, vectors = np.linalg.eigh(gram)
    s = np.sqrt(np.clip(values[::-1], 0.0, None))
    return Spectrum(s, total, "gram", True, w, np.ascontiguousarray(vectors[:, ::-1]), None, tall)


def residual(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """||W - A B||_F^2 in float64, a block of rows at a time (no float64 copy of W or of A B)."""
    total = 0.0
    for rows in _row_blocks(w):
        diff = a[rows] @ b
        np.subtract(w[rows], diff, out=diff)
        total += float(np.sum(np.square(diff)))
    return total


def _row_blocks(w: np.ndarray) -> list[slice]:
    """Slices of rows of `w` whose float64 copy stays near _BLOCK_BYTES."""
    step = max(1, _BLOCK_BYTES // (8 * max(1, w.shape[1])))
    return [slice(i, i + step) for i in range(0, w.shape[0], step)]


def _gram(w: np.ndarray) -> np.ndarray:
    """W^T W in float64 for a tall W, summed over blocks of rows (no float64 copy of W)."""
    gram = np.zeros((w.shape[1], w.shape[1]))
    for rows in _row_blocks(w):
        block = w[rows].astype(np.float64)
        gram += block.T @ block
    return gram


def _product(w: np.ndarray, m: np.ndarray) -> np.ndarray:
    """W @ M in float64 (M float64), a block of W's rows at a time."""
    out = np.empty((w.shape[0], m.shape[1]))
    for rows in _row_blocks(w):
        out[rows] = w[rows].astype(np.float64) @ m
    return out


def break_even(k: int, n: int) -> int:
    """The largest rank r with r * (K + N) < K * N: factors smaller than the matrix."""
    return (k * n - 1) // (k + n)


def energy_rank(spectrum: Spectrum, energy: float) -> int:
    """Smallest rank whose squared singular values hold `energy` of the total (len(s) + 1 when they do not)."""
    kept = np.cumsum(np.square(spectrum.s, dtype=np.float64))
    r = int(np.searchsorted(kept, energy * spectrum.total * (1 - 1e-12))) + 1
    if r > len(spectrum.s) and spectrum.complete:  # a complete spectrum misses the total only by rounding
        r = len(spectrum.s)
    return r


def error_rank(spectrum: Spectrum, limit: float) -> int:
    """Smallest rank whose tail (squared error) is at most `limit` (len(s) + 1 when the known spectrum is short)."""
    tails = spectrum.total - np.concatenate([[0.0], np.cumsum(np.square(spectrum.s, dtype=np.float64))])
    fits = np.flatnonzero(tails <= limit * (1 + 1e-12))
    return int(fits[0]) if fits.size else len(spectrum.s) + 1


def allocate(spectra: list[Spectrum], references: list[float], shapes: list[tuple[int, int]], budget: int) -> list[int]:
    """Ranks meeting a total parameter budget with the least summed relative error (0: leave the matrix whole).

    Every singular value i of matrix j is worth s_ij^2 / reference_j of relative squared error per K_j + N_j
    parameters; one threshold on that worth keeps the most valuable values everywhere. A matrix whose rank
    would pass its break-even costs K * N (it stays whole, with no error). The threshold is the smallest
    whose total cost fits the budget; the cost falls as the threshold rises.
    """
    worth = [
        np.square(sp.s) / max(ref, 1e-300) / (k + n)
        for sp, ref, (k, n) in zip(spectra, references, shapes, strict=True)
    ]

    def ranks(threshold: float) -> list[int]:
        return [int(np.count_nonzero(v >= threshold)) for v in worth]

    def cost(rs: list[int]) -> int:
        return sum(k * n if r > break_even(k, n) else r * (k + n) for r, (k, n) in zip(rs, shapes, strict=True))

    candidates = np.unique(np.concatenate([*worth, [np.inf]]))
    lo, hi = 0, len(candidates) - 1  # candidates[hi] = inf keeps rank 0 everywhere: cost 0
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(ranks(float(candidates[mid]))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    chosen = ranks(float(candidates[lo]))
    return [0 if r > break_even(k, n) else r for r, (k, n) in zip(chosen, shapes, strict=True)]


def balance(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rescale A's columns and B's rows so each pair has the same norm (same product; friendlier to int8)."""
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1)
    scale = np.sqrt(np.divide(nb, na, out=np.ones_like(na), where=(na > 0) & (nb > 0)))
    return a * scale, b / scale[:, None]


def _exact(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if w.shape[0] < w.shape[1]:  # gesdd is about 1.5x faster on the tall orientation
        u, s, vt = _exact(w.T)
        return vt.T, s, u.T
    return np.linalg.svd(w, full_matrices=False)


def _randomized(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated SVD by a Gaussian range finder with power iterations, rank + oversampling."""
    size = min(rank + _OVERSAMPLE, min(w.shape))
    rng = np.random.default_rng(0)  # fixed seed: the same model always gets the same factors
    y = w @ rng.standard_normal((w.shape[1], size), dtype=w.dtype)
    for _ in range(_POWER_ITERATIONS):
        # Re-orthonormalizing keeps the columns from collapsing onto the top singular vector.
        y = w @ np.linalg.qr(w.T @ np.linalg.qr(y)[0])[0]
    q = np.linalg.qr(y)[0]
    u_small, s, vt = np.linalg.svd(q.T @ w, full_matrices=False)
    keep = min(rank, len(s))
    return q @ u_small[:, :keep], s[:keep], vt[:keep]


def relative(value: float, reference: float) -> float:
    """sqrt(value / reference), 0 when both are 0."""
    return math.sqrt(value / reference) if reference > 0 else float(value > 0)


def blas_threads() -> tuple[contextlib.AbstractContextManager[object], int]:
    """One BLAS thread per matrix and one matrix per core, when threadpoolctl can set the BLAS thread count.

    Measured on 2 shared cores: OpenBLAS's own threads make these mid-sized LAPACK calls up to 4x slower
    (synchronization, oversubscription), while one SVD per core is about 2x faster than serial work.
    """
    try:
        import threadpoolctl  # optional: without it BLAS keeps its own threads
    except ImportError:
        return contextlib.nullcontext(), 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return threadpoolctl.threadpool_limits(limits=1, user_api="blas"), cores
