"""The factorization numerics: the Gram fast path against numpy's SVD, rank rules and the parameter allocator."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_ops.passes._svd_math import allocate, balance, break_even, decompose, energy_rank, error_rank


def _matrix(k: int, n: int, seed: int, decay: float = 30.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = min(k, n)
    u, v = np.linalg.qr(rng.standard_normal((k, m)))[0], np.linalg.qr(rng.standard_normal((n, m)))[0]
    s = np.exp(-np.arange(m) / decay) + 0.05 * rng.random(m)
    return ((u * np.sort(s)[::-1]) @ v.T).astype(np.float32)


@pytest.mark.parametrize(("k", "n"), [(200, 120), (120, 200), (150, 150)])
@pytest.mark.parametrize("algorithm", ["gram", "exact"])
def test_decomposition_agrees_with_numpy_svd(k: int, n: int, algorithm: str) -> None:
    w = _matrix(k, n, seed=k + n)
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    spectrum = decompose(w, algorithm)
    np.testing.assert_allclose(spectrum.s, s, rtol=1e-6, atol=1e-6 * s[0])
    assert spectrum.total == pytest.approx(float(np.sum(s**2)), rel=1e-9)
    for r in (1, 17, 60):
        a, b = spectrum.factors(r)
        assert a.shape == (k, r) and b.shape == (r, n)
        np.testing.assert_allclose(a @ b, (u[:, :r] * s[:r]) @ vt[:r], atol=1e-5 * s[0])
        assert spectrum.tail(r) == pytest.approx(float(np.sum(s[r:] ** 2)), rel=1e-6)
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-6)


def test_gram_path_handles_an_exactly_low_rank_matrix() -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((90, 5)) @ rng.standard_normal((5, 70))).astype(np.float32)
    spectrum = decompose(w)
    assert spectrum.algorithm == "gram"
    a, b = spectrum.factors(5)
    np.testing.assert_allclose(a @ b, w, atol=1e-4 * float(np.abs(w).max()))
    a, b = spectrum.factors(8)  # past the rank: the extra columns are zero, not NaN
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))


def test_randomized_keeps_only_the_sketched_values() -> None:
    w = _matrix(300, 200, seed=2, decay=5.0)
    spectrum = decompose(w, "randomized", sketch=20)
    exact = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert len(spectrum.s) == 20 and not spectrum.complete
    np.testing.assert_allclose(spectrum.s[:10], exact[:10], rtol=1e-3)  # the top of the sketch is accurate
    assert np.all(spectrum.s <= exact[:20] * (1 + 1e-6))  # a projection never inflates a singular value


def test_rank_rules() -> None:
    spectrum = decompose(np.diag([4.0, 2.0, 1.0, 1.0]))  # energies 16, 4, 1, 1 of 22
    assert energy_rank(spectrum, 16 / 22) == 1 and energy_rank(spectrum, 0.9) == 2 and energy_rank(spectrum, 1.0) == 4
    assert error_rank(spectrum, 2.0) == 2 and error_rank(spectrum, 1.9) == 3 and error_rank(spectrum, 0.0) == 4
    assert break_even(64, 32) == 21 and break_even(4, 4) == 1


def test_allocate_spends_rank_where_it_removes_the_most_error() -> None:
    steep = decompose(np.diag(0.8 ** np.arange(40.0)))  # a few values hold nearly everything
    flat = decompose(np.diag(np.linspace(1.0, 0.8, 40)))
    spectra, shapes = [steep, flat], [(40, 40), (40, 40)]
    ranks = allocate(spectra, [s.total for s in spectra], shapes, budget=1600)
    assert sum(r * 80 for r in ranks) <= 1600

    def error(rs: list[int]) -> float:
        return sum(s.tail(r) / s.total for s, r in zip(spectra, rs, strict=True))

    assert error(ranks) < error([10, 10]) and error(ranks) <= min(error([r, 20 - r]) for r in range(21)) + 1e-12
    # Past a matrix's break-even (19 for 40x40) it stays whole (rank 0) rather than being factorized at a loss.
    assert allocate([flat], [flat.total], [(40, 40)], budget=1599) == [19]
    assert allocate([flat], [flat.total], [(40, 40)], budget=1600) == [0]


def test_balance_keeps_the_product() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((30, 4)) * 100, rng.standard_normal((4, 20)) / 100
    a2, b2 = balance(a, b)
    np.testing.assert_allclose(a2 @ b2, a @ b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(a2, axis=0), np.linalg.norm(b2, axis=1))
