"""The fit shared by block-wise refinement: a block's arrays tuned so that its output matches the teacher's.

Used for full-rank FFN blocks (``_blockwise``) and factorized ones (``_blockwise_lowrank``).

The GELU is recognised by reproducing the student's own block output in numpy (exact erf, else tanh). The fit
trains on the even calibration feeds (fold 0) by Adam on minibatches, with a cosine-decayed step relative to
each array's RMS at the start, and checks the odd feeds (fold 1) ten times: it keeps the arrays of the check
that predicts them best, and the block keeps the refinement only when that beats its start by 1 % there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Protocol, Self, TypeVar

import numpy as np
import scipy.special

__all__ = [
    "ELEMENTWISE",
    "MAX_NODES",
    "Activation",
    "Adam",
    "Params",
    "Result",
    "error",
    "fit",
    "gelu_erf",
    "gelu_tanh",
    "rms",
]

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Pow", "Sigmoid", "Gelu", "FastGelu", "BiasGelu"}
MAX_NODES = 16  # nodes between the two layers of a block
_BATCH = 256  # rows per gradient step
_CHECK = 1e-3  # relative error of numpy's block forward pass against ONNX Runtime's that recognises the GELU
_RATE = 2e-3  # Adam's step, relative to each array's RMS

Activation = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # a -> (gelu(a), gelu'(a))


@dataclasses.dataclass(frozen=True)
class Result:
    """What refinement did to one block: held-out relative squared errors before and after, and whether kept."""

    before: float
    after: float
    steps: int
    kept: bool
    reason: str = ""


class Params(Protocol):
    """A block's trainable arrays (float32), its forward pass and the gradients of its arrays."""

    def arrays(self) -> list[np.ndarray]:
        """The arrays, in the order of `gradients` (updated in place)."""
        ...

    def copy(self) -> Self:
        """A copy with arrays of its own."""
        ...

    def forward(self, x: np.ndarray, act: Activation) -> tuple[np.ndarray, ...]:
        """The block's output for rows x first, then what the gradients need."""
        ...

    def gradients(self, x: np.ndarray, y: np.ndarray, act: Activation, norm: float) -> list[np.ndarray]:
        """Gradients of the mean squared error (per row, relative to the mean squared output `norm`)."""
        ...


P = TypeVar("P", bound=Params)


def gelu_erf(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact GELU and its derivative."""
    cdf = 0.5 * (1.0 + scipy.special.erf(a / math.sqrt(2.0)))
    return a * cdf, cdf + a * np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)


def gelu_tanh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tanh approximation of the GELU and its derivative."""
    c = math.sqrt(2.0 / math.pi)
    t = np.tanh(c * (a + 0.044715 * a**3))
    return 0.5 * a * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * a * a)


def rms(a: np.ndarray) -> float:
    """The root mean square of an array (at least 1e-8): the scale of its Adam steps."""
    return max(float(np.sqrt(np.mean(a * a))), 1e-8)


def error(params: Params, x: np.ndarray, y: np.ndarray, act: Activation) -> float:
    """Relative squared error of the block's output on these rows (summed in float64)."""
    z = params.forward(x, act)[0].astype(np.float64)
    y64 = y.astype(np.float64)
    return float(np.sum((z - y64) ** 2) / max(float(np.sum(y64 * y64)), 1e-300))


class Adam:
    """Adam with a cosine-decayed step relative to a scale per array; masked arrays keep their zeros.

    ``scale_first`` multiplies the bias-corrected first moment by the step before dividing it by the root of
    the second (the factorized fit's order), else after: the two orders round differently in float32.
    """

    def __init__(
        self, arrays: list[np.ndarray], scales: list[float], masks: list[np.ndarray | None], scale_first: bool
    ) -> None:
        self.scales, self.masks, self.scale_first = scales, masks, scale_first
        self.moments = [(np.zeros_like(a), np.zeros_like(a)) for a in arrays]

    def step(self, arrays: list[np.ndarray], grads: list[np.ndarray], step: int, steps: int) -> None:
        """Update the arrays in place by one step (1-based) of `steps`."""
        rate = _RATE * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
        first, second = 1 - 0.9**step, 1 - 0.999**step
        for array, grad, scale, mask, (m, v) in zip(arrays, grads, self.scales, self.masks, self.moments, strict=True):
            m *= 0.9
            m += 0.1 * grad
            v *= 0.999
            v += 0.001 * grad * grad
            if self.scale_first:
                array -= np.float32(rate * scale) * (m / first) / (np.sqrt(v / second) + 1e-12)
            else:
                array -= np.float32(rate * scale) * ((m / first) / (np.sqrt(v / second) + 1e-12))
            if mask is not None:
                array *= mask


def fit(
    start: P,
    x: np.ndarray,
    z: np.ndarray,
    y: np.ndarray,
    fold: np.ndarray,
    steps: int,
    scales: list[float],
    masks: list[np.ndarray | None] | None = None,
    scale_first: bool = False,
) -> tuple[P | None, Result]:
    """Tune a block's arrays towards the teacher's output y: the best arrays when they are kept, and the result.

    Args:
        start: The block's arrays at the start (not changed).
        x: [rows, k] the student's block inputs.
        z: [rows, n] the student's own block outputs (to recognise the GELU).
        y: [rows, n] the teacher's block outputs.
        fold: [rows] 0 for training rows, 1 for held-out rows.
        steps: Gradient steps.
        scales: The scale of each array's steps (see `rms`).
        masks: Per array, where it may be non-zero (None: anywhere).
        scale_first: The order of Adam's update (see `Adam`).
    """
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    act = next((f for f in (gelu_erf, gelu_tanh) if error(start, x32[:256], z[:256], f) < _CHECK**2), None)
    if act is None:
        return None, Result(0.0, 0.0, 0, False, "numpy's GELU forward pass does not reproduce the block's output")
    train, held, y_train, y_held = x32[fold == 0], x32[fold == 1], y32[fold == 0], y32[fold == 1]
    if len(train) < _BATCH or len(held) == 0:
        return None, Result(0.0, 0.0, 0, False, "too few calibration rows")
    before = error(start, held, y_held, act)
    best, best_error, best_step = start, before, 0
    params = start.copy()
    adam = Adam(params.arrays(), scales, masks or [None] * len(scales), scale_first)
    rng = np.random.default_rng(0)
    norm = float(np.mean(np.sum(y_train**2, axis=1)))
    for step in range(1, steps + 1):
        rows = rng.choice(len(train), _BATCH, replace=False)
        adam.step(params.arrays(), params.gradients(train[rows], y_train[rows], act, norm), step, steps)
        if step % max(steps // 10, 1) == 0 or step == steps:
            held_error = error(params, held, y_held, act)
            if held_error < best_error:
                best, best_error, best_step = params.copy(), held_error, step
    kept = best_error < 0.99 * before
    reason = "" if kept else "no step predicted held-out rows better"
    return (best if kept else None), Result(before, best_error, best_step, kept, reason)
