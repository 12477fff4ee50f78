"""Block-wise refinement of transformer FFN blocks (MatMul + bias, GELU, MatMul + bias) by gradient descent.

A layer-wise refit matches each layer's output to the teacher's on its own; the first layer of an FFN block
is then fit to pre-activations whose errors GELU partly hides, and the second to inputs the first leaves
wrong. Here both layers of a block are tuned together so that the block's output, computed from the
inputs the student itself feeds it, matches the teacher's block output: ``z = gelu(x W1 + b1) W2 + b2``
against the teacher's z on the calibration rows (real tokens only, see ``onnx_ops.capture``), by Adam in
numpy, with pruned weights kept at zero.

A block is recognised from the graph (two refit layers joined only by elementwise nodes) and checked on
the rows: numpy's forward pass with the exact (erf) or tanh GELU must reproduce ONNX Runtime's block output,
else the block is left alone. The fit (``_blockwise_fit``) trains on the even calibration feeds and is judged
on the odd ones: it keeps the step count that predicts them best, and the block keeps the refinement only when
that beats the layer-wise result on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_ops.passes._blockwise_fit import ELEMENTWISE, MAX_NODES, Activation, Result, fit, rms
from onnx_ops.passes._layers import Linear

__all__ = ["Block", "Result", "ffn_blocks", "refine"]


@dataclasses.dataclass
class Block:
    """An FFN block: ``down(gelu(up(x)))``, both layers MatMul/Gemm with a bias."""

    up: Linear
    down: Linear

    @property
    def name(self) -> str:
        """The block's name for reports."""
        return f"{self.up.name} -> {self.down.name}"


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
        if node is None or node.op_type not in ELEMENTWISE or seen > MAX_NODES:
            return None
        stack.extend(v for v in node.inputs if v is not None and v.const_value is None)
    return layers[found.pop()] if len(found) == 1 else None


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

    def copy(self) -> _Params:
        return _Params(*(a.copy() for a in self.arrays()))

    def forward(self, x: np.ndarray, act: Activation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block output z, and the pre-activation's derivative and the activation (for the gradient)."""
        g, slope = act(x @ self.w1 + self.b1)
        return g @ self.w2 + self.b2, slope, g

    def gradients(self, x: np.ndarray, y: np.ndarray, act: Activation, norm: float) -> list[np.ndarray]:
        """Gradients of the mean squared error (per row, relative to the mean squared output)."""
        z, slope, g = self.forward(x, act)
        dz = (z - y) * np.float32(2.0 / (len(x) * norm))
        da = (dz @ self.w2.T) * slope
        return [x.T @ da, da.sum(axis=0), g.T @ dz, dz.sum(axis=0)]


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
    start = _Params.of(block)
    scales = [rms(start.w1), rms(start.w1), rms(start.w2), rms(start.w2)]
    masks = [start.w1 != 0, None, start.w2 != 0, None]
    best, result = fit(start, x, z.astype(np.float32, copy=False), y, fold, steps, scales, masks)
    if best is not None:
        block.up.store(best.w1[None].astype(np.float64), best.b1[None].astype(np.float64))
        block.down.store(best.w2[None].astype(np.float64), best.b2[None].astype(np.float64))
    return result
