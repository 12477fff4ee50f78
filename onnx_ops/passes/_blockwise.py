"""Block-wise refinement of transformer FFN blocks (MatMul + bias, GELU, MatMul + bias) by gradient descent.

A layer-wise refit matches each layer's output to the teacher's on its own; the first layer of an FFN block
is then fit to pre-activations whose errors GELU partly hides, and the second to inputs the first leaves
wrong. Here both layers of a block are tuned together so that the block's output, computed from the
inputs the student itself feeds it, matches the teacher's block output: ``z = gelu(x W1 + b1) W2 + b2``
against the teacher's z on the calibration rows (real tokens only, see ``onnx_ops.capture``), by Adam in
numpy, with pruned weights kept at zero.

A block is recognised from the graph (two refit layers joined only by elementwise nodes) and checked on
the rows: numpy's forward pass with the exact (erf) or tanh GELU must reproduce ONNX Runtime's block output,
else the block is left alone. The fit trains on the even calibration feeds and is judged on the odd ones:
it keeps the step count that predicts them best, and the block keeps the refinement only when that beats
the layer-wise result on them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
import scipy.special

from onnx_ops.passes._layers import Linear

__all__ = ["Block", "Result", "ffn_blocks", "refine"]

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Pow", "Sigmoid", "Gelu", "FastGelu", "BiasGelu"}
_MAX_NODES = 16  # nodes between the two layers of a block
_BATCH = 256  # rows per gradient step
_CHECK = 1e-3  # relative error of numpy's block forward pass against ONNX Runtime's that recognises the GELU

Activation = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # a -> (gelu(a), gelu'(a))


@dataclasses.dataclass
class Block:
    """An FFN block: ``down(gelu(up(x)))``, both layers MatMul/Gemm with a bias."""

    up: Linear
    down: Linear

    @property
    def name(self) -> str:
        """The block's name for reports."""
        return f"{self.up.name} -> {self.down.name}"


@dataclasses.dataclass(frozen=True)
class Result:
    """What refinement did to one block: held-out relative squared errors before and after, and whether kept."""

    before: float
    after: float
    steps: int
    kept: bool
    reason: str = ""


def ffn_blocks(targets: Sequence[Linear]) -> list[Block]:
    """Pairs of layers where the second reads the first's output through elementwise nodes only, in order."""
    outputs = {t.layer.output: t for t in targets if t.layer.conv is None and t.bias is not None}
    blocks = []
    for down in targets:
        source = down.node.inputs[0]
        if down.layer.conv is not None or down.bias is None or source is None:
            continue
        up = _upstream(source, outputs)
        if up is not None and up is not down and up.layer.n == down.layer.k:
            blocks.append(Block(up, down))
    return blocks


def _upstream(value: ir.Value, outputs: dict[str, Linear]) -> Linear | None:
    """The one layer whose output reaches `value` through elementwise nodes with constant other inputs."""
    found: set[int] = set()
    layers: dict[int, Linear] = {}
    stack, seen = [value], 0
    while stack:
        current = stack.pop()
        if current.name in outputs:
            layer = outputs[current.name or ""]
            found.add(id(layer))
            layers[id(layer)] = layer
            continue
        node = current.producer()
        seen += 1
        if node is None or node.op_type not in _ELEMENTWISE or seen > _MAX_NODES:
            return None
        stack.extend(v for v in node.inputs if v is not None and v.const_value is None)
    return layers[found.pop()] if len(found) == 1 else None


def _gelu_erf(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cdf = 0.5 * (1.0 + scipy.special.erf(a / math.sqrt(2.0)))
    return a * cdf, cdf + a * np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)


def _gelu_tanh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = math.sqrt(2.0 / math.pi)
    t = np.tanh(c * (a + 0.044715 * a**3))
    return 0.5 * a * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * a * a)


@dataclasses.dataclass
class _Params:
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @classmethod
    def of(cls, block: Block) -> _Params:
        """The block's current weights, in float32 (the arithmetic of the fit)."""
        arrays = block.up.matrices()[0], block.up.bias_rows()[0], block.down.matrices()[0], block.down.bias_rows()[0]
        return cls(*(a.astype(np.float32) for a in arrays))

    def arrays(self) -> list[np.ndarray]:
        return [self.w1, self.b1, self.w2, self.b2]

    def forward(self, x: np.ndarray, act: Activation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block output z, and the pre-activation's derivative and the activation (for the gradient)."""
        g, slope = act(x @ self.w1 + self.b1)
        return g @ self.w2 + self.b2, slope, g


def _error(params: _Params, x: np.ndarray, y: np.ndarray, act: Activation) -> float:
    """Relative squared error of the block's output on these rows (summed in float64)."""
    z = params.forward(x, act)[0].astype(np.float64)
    y64 = y.astype(np.float64)
    return float(np.sum((z - y64) ** 2) / max(float(np.sum(y64 * y64)), 1e-300))


def _activation(params: _Params, x: np.ndarray, z: np.ndarray) -> Activation | None:
    """The GELU with which numpy's forward pass reproduces the student's own block output z, or None."""
    for act in (_gelu_erf, _gelu_tanh):
        if _error(params, x, z, act) < _CHECK**2:
            return act
    return None


def refine(block: Block, x: np.ndarray, z: np.ndarray, y: np.ndarray, fold: np.ndarray, steps: int) -> Result:
    """Tune a block towards the teacher's output y; stores the weights only when held-out rows improve.

    Args:
        block: The block (its layers' current weights are the start).
        x: [rows, k] the student's block inputs.
        z: [rows, n] the student's own block outputs (to recognise the GELU).
        y: [rows, n] the teacher's block outputs.
        fold: [rows] 0 for training rows, 1 for held-out rows.
        steps: Gradient steps.
    """
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    start = _Params.of(block)
    act = _activation(start, x32[:256], z[:256].astype(np.float32))
    if act is None:
        return Result(0.0, 0.0, 0, False, "numpy's GELU forward pass does not reproduce the block's output")
    train, held = x32[fold == 0], x32[fold == 1]
    y_train, y_held = y32[fold == 0], y32[fold == 1]
    if len(train) < _BATCH or len(held) == 0:
        return Result(0.0, 0.0, 0, False, "too few calibration rows")
    before = _error(start, held, y_held, act)
    best, best_error, best_step = start, before, 0
    params = _Params(*(a.copy() for a in start.arrays()))
    masks = [params.w1 != 0, None, params.w2 != 0, None]
    scales = [_rms(params.w1), _rms(params.w1), _rms(params.w2), _rms(params.w2)]
    moments = [(np.zeros_like(a), np.zeros_like(a)) for a in params.arrays()]
    rng = np.random.default_rng(0)
    norm = float(np.mean(np.sum(y_train**2, axis=1)))
    check = max(steps // 10, 1)
    for step in range(1, steps + 1):
        rows = rng.choice(len(train), _BATCH, replace=False)
        grads = _gradients(params, train[rows], y_train[rows], act, norm)
        rate = 2e-3 * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
        for array, grad, mask, scale, (m, v) in zip(params.arrays(), grads, masks, scales, moments, strict=True):
            m *= 0.9
            m += 0.1 * grad
            v *= 0.999
            v += 0.001 * grad * grad
            update = (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-12)
            array -= np.float32(rate * scale) * update
            if mask is not None:
                array *= mask
        if step % check == 0 or step == steps:
            error = _error(params, held, y_held, act)
            if error < best_error:
                best, best_error, best_step = _Params(*(a.copy() for a in params.arrays())), error, step
    kept = best_error < 0.99 * before
    if kept:
        block.up.store(best.w1[None].astype(np.float64), best.b1[None].astype(np.float64))
        block.down.store(best.w2[None].astype(np.float64), best.b2[None].astype(np.float64))
    return Result(before, best_error, best_step, kept, "" if kept else "no step predicted held-out rows better")


def _rms(a: np.ndarray) -> float:
    return max(float(np.sqrt(np.mean(a * a))), 1e-8)


def _gradients(params: _Params, x: np.ndarray, y: np.ndarray, act: Activation, norm: float) -> list[np.ndarray]:
    """Gradients of the mean squared error (per row, relative to the mean squared output) of every parameter."""
    z, slope, g = params.forward(x, act)
    dz = (z - y) * np.float32(2.0 / (len(x) * norm))
    da = (dz @ params.w2.T) * slope
    return [x.T @ da, da.sum(axis=0), g.T @ dz, dz.sum(axis=0)]
