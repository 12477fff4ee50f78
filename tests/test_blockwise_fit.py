"""The fit shared by block-wise refinement: Adam on the training fold, keep-if-better on the held-out fold."""

from __future__ import annotations

import numpy as np

from onnx_ops.passes._blockwise import _Params
from onnx_ops.passes._blockwise_fit import Result, fit, gelu_erf, gelu_tanh, rms


def _block(seed: int, k: int = 8, hidden: int = 24) -> _Params:
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((k, hidden)) / np.sqrt(k), rng.standard_normal((hidden, k)) / np.sqrt(hidden)
    w1[rng.random(w1.shape) < 0.5] = 0.0  # pruned weights
    arrays = w1, 0.3 * rng.standard_normal(hidden), w2, 0.1 * rng.standard_normal(k)
    return _Params(*(a.astype(np.float32) for a in arrays))


def _rows(rows: int = 1200, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return rng.standard_normal((rows, k)).astype(np.float32), np.arange(rows) % 2


def _fit(start: _Params, x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> tuple[_Params | None, Result]:
    z = start.forward(x, gelu_erf)[0]
    scales = [rms(start.w1), rms(start.w1), rms(start.w2), rms(start.w2)]
    return fit(start, x, z, y, fold, 40, scales, [start.w1 != 0, None, start.w2 != 0, None])


def test_fit_moves_towards_the_teacher_keeps_the_zeros_and_leaves_the_start_alone() -> None:
    start, teacher = _block(0), _block(0)
    teacher.w2 += 0.2 * np.random.default_rng(1).standard_normal(teacher.w2.shape).astype(np.float32)
    x, fold = _rows()
    original = [a.copy() for a in start.arrays()]
    best, result = _fit(start, x, teacher.forward(x, gelu_erf)[0], fold)
    assert best is not None and result.kept and result.after < 0.99 * result.before, result
    assert 0 < result.steps <= 40
    np.testing.assert_array_equal(best.w1 == 0, original[0] == 0)
    assert not np.array_equal(best.w2, original[2])
    for array, before in zip(start.arrays(), original, strict=True):
        np.testing.assert_array_equal(array, before)


def test_fit_keeps_nothing_when_no_step_beats_the_start_on_held_out_rows() -> None:
    start = _block(2)
    x, fold = _rows()
    best, result = _fit(start, x, start.forward(x, gelu_erf)[0], fold)  # the start is the teacher already
    assert best is None and not result.kept, result
    assert result.reason == "no step predicted held-out rows better"


def test_fit_recognises_the_tanh_gelu_and_refuses_another_activation() -> None:
    start = _block(3)
    x, fold = _rows()
    relu = np.maximum(x @ start.w1 + start.b1, 0) @ start.w2 + start.b2
    scales = [1.0] * 4
    best, result = fit(start, x, relu, relu, fold, 5, scales)
    assert best is None and "GELU" in result.reason, result
    tanh = start.forward(x, gelu_tanh)[0]
    teacher = tanh + 0.05 * np.random.default_rng(4).standard_normal(tanh.shape).astype(np.float32)
    _, result = fit(start, x, tanh, teacher, fold, 5, scales)
    assert "GELU" not in result.reason, result
