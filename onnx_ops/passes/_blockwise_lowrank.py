"""Block-wise refinement of factorized transformer FFN blocks: both layers' low-rank factors tuned together.

After SVD an FFN block is ``z = gelu(x A1 B1 + b1) A2 B2 + b2``: each layer a pair of MatMuls through its
factors (``_svd_graph.rewrite``) and a constant bias Add. Activation-aware SVD fits each layer to its own
output; the first layer's pre-activation error is partly hidden by GELU, and the second layer is fit to the
inputs the first leaves wrong. Here the four factors and the two biases are tuned together by Adam in numpy
so that the block's output, from the inputs the student itself feeds it, matches the teacher's block output
on the calibration rows (real tokens only, see ``onnx_ops.capture``). The ranks do not change.

As in ``_blockwise`` (full-rank blocks; the fit is ``_blockwise_fit``), the GELU is recognised by reproducing
ONNX Runtime's block output, the fit trains on the even calibration feeds and keeps the step that predicts the
odd feeds best, and a block keeps the refinement only when it beats the starting factors on those held-out feeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_ops.capture import Session, capture_rows
from onnx_ops.passes._base import Feed, constant_array, is_constant_weight, set_constant
from onnx_ops.passes._blockwise_fit import ELEMENTWISE, MAX_NODES, Activation, Result, fit, rms

__all__ = ["Factored", "LowRankBlock", "lowrank_blocks", "refine_blocks", "refine_lowrank"]


@dataclasses.dataclass
class Factored:
    """A factorized layer ``(x @ A) @ B + bias``: the first MatMul's input, the factors, the bias and its output."""

    x: ir.Value
    a: ir.Value
    b: ir.Value
    bias: ir.Value
    output: ir.Value

    def arrays(self) -> list[np.ndarray]:
        """A [k, r], B [r, n] and the bias [n], in float32."""
        return [constant_array(v).astype(np.float32).reshape(-1 if v is self.bias else constant_array(v).shape)
                for v in (self.a, self.b, self.bias)]  # fmt: skip

    def store(self, a: np.ndarray, b: np.ndarray, bias: np.ndarray) -> None:
        """Write the factors and the bias back in their stored types and shapes."""
        for value, array in ((self.a, a), (self.b, b), (self.bias, bias)):
            stored = constant_array(value)
            set_constant(value, array.astype(stored.dtype).reshape(stored.shape))


@dataclasses.dataclass
class LowRankBlock:
    """An FFN block of two factorized layers joined by elementwise nodes only."""

    up: Factored
    down: Factored

    @property
    def name(self) -> str:
        """The block's name for reports: its output tensor."""
        return f"{self.up.output.name} -> {self.down.output.name}"


def lowrank_blocks(graph: ir.Graph) -> list[LowRankBlock]:
    """The factorized FFN blocks of the main graph, in graph order."""
    layers = [f for f in (_factored(node) for node in graph) if f is not None]
    by_output = {id(f.output): f for f in layers}
    blocks = []
    for down in layers:
        up = _upstream(down.x, by_output)
        if up is not None and up is not down and constant_array(up.b).shape[1] == constant_array(down.a).shape[0]:
            blocks.append(LowRankBlock(up, down))
    return blocks


def _factored(node: ir.Node) -> Factored | None:
    """The factorized layer whose second MatMul is `node` (with one constant bias Add after it), or None."""
    if node.op_type != "MatMul" or node.domain != "" or not is_constant_weight(node.inputs[1]):
        return None
    first = node.inputs[0].producer() if node.inputs[0] is not None else None
    if first is None or first.op_type != "MatMul" or first.domain != "" or not is_constant_weight(first.inputs[1]):
        return None
    if len(node.inputs[0].uses()) != 1 or first.inputs[0] is None:  # type: ignore[union-attr]
        return None
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or node.outputs[0].is_graph_output():
        return None
    add = uses[0].node
    bias = add.inputs[1 - uses[0].idx]
    n = constant_array(node.inputs[1]).shape[-1]  # type: ignore[arg-type]
    if bias is None or not is_constant_weight(bias) or len(bias.uses()) != 1 or constant_array(bias).size != n:
        return None
    weights = [constant_array(v) for v in (first.inputs[1], node.inputs[1], bias)]  # type: ignore[arg-type]
    if any(w.ndim > 2 or not np.issubdtype(w.dtype, np.floating) for w in weights):
        return None
    return Factored(first.inputs[0], first.inputs[1], node.inputs[1], bias, add.outputs[0])  # type: ignore[arg-type]


def _upstream(value: ir.Value, by_output: dict[int, Factored]) -> Factored | None:
    """The one factorized layer whose output reaches `value` through elementwise nodes with constant other inputs."""
    found: dict[int, Factored] = {}
    stack, seen = [value], 0
    while stack:
        current = stack.pop()
        if id(current) in by_output:
            found[id(current)] = by_output[id(current)]
            continue
        node = current.producer()
        seen += 1
        if node is None or node.op_type not in ELEMENTWISE or seen > MAX_NODES:
            return None
        stack.extend(v for v in node.inputs if v is not None and v.const_value is None)
    return next(iter(found.values())) if len(found) == 1 else None


@dataclasses.dataclass
class _Params:
    a1: np.ndarray
    b1: np.ndarray
    c1: np.ndarray
    a2: np.ndarray
    b2: np.ndarray
    c2: np.ndarray

    def arrays(self) -> list[np.ndarray]:
        return [self.a1, self.b1, self.c1, self.a2, self.b2, self.c2]

    def copy(self) -> _Params:
        return _Params(*(a.copy() for a in self.arrays()))

    def forward(self, x: np.ndarray, act: Activation) -> tuple[np.ndarray, ...]:
        """Block output z, and what the gradient needs: x A1, gelu'(pre-activation), gelu(.), gelu(.) A2."""
        h = x @ self.a1
        g, slope = act(h @ self.b1 + self.c1)
        u = g @ self.a2
        return u @ self.b2 + self.c2, h, slope, g, u

    def gradients(self, x: np.ndarray, y: np.ndarray, act: Activation, norm: float) -> list[np.ndarray]:
        """Gradients of the mean squared error (per row, relative to the mean squared output)."""
        z, h, slope, g, u = self.forward(x, act)
        dz = (z - y) * np.float32(2.0 / (len(x) * norm))
        du = dz @ self.b2.T
        da = ((du @ self.a2.T) * slope).astype(np.float32)
        dh = da @ self.b1.T
        return [x.T @ dh, h.T @ da, da.sum(axis=0), g.T @ du, u.T @ dz, dz.sum(axis=0)]


def refine_lowrank(
    block: LowRankBlock, x: np.ndarray, z: np.ndarray, y: np.ndarray, fold: np.ndarray, steps: int
) -> Result:
    """Tune a factorized block towards the teacher's output y; stores the factors only when held-out rows improve.

    Args:
        block: The block (its current factors are the start).
        x: [rows, k] the student's block inputs.
        z: [rows, n] the student's own block outputs (to recognise the GELU).
        y: [rows, n] the teacher's block outputs.
        fold: [rows] 0 for training rows, 1 for held-out rows.
        steps: Gradient steps.
    """
    start = _Params(*block.up.arrays(), *block.down.arrays())
    scale = [rms(a) for a in start.arrays()]  # a bias steps by its layer's B
    scales = [scale[0], scale[1], scale[1], scale[3], scale[4], scale[4]]
    best, result = fit(start, x, z, y, fold, steps, scales, scale_first=True)
    if best is not None:
        block.up.store(best.a1, best.b1, best.c1)
        block.down.store(best.a2, best.b2, best.c2)
    return result


def refine_blocks(model: ir.Model, teacher: onnx.ModelProto | Path, feeds: Sequence[Feed], steps: int) -> list[str]:
    """Refine every factorized FFN block in graph order on the inputs the student produces; a note per block.

    Blocks whose output the teacher does not have are left alone. Needs at least 4 feeds (2 folds). A teacher
    given as a Path is a file whose weights ONNX Runtime maps (see capture.Session).
    """
    if steps <= 0 or len(feeds) < 4:
        return []
    graph = onnx.load(teacher, load_external_data=False) if isinstance(teacher, Path) else teacher
    blocks = [b for b in lowrank_blocks(model.graph) if _has(graph, b.down.output.name or "")]
    del graph
    if not blocks:
        return []
    session = Session(teacher, [b.down.output.name or "" for b in blocks])
    notes = []
    for block in blocks:
        x, z = block.up.x.name or "", block.down.output.name or ""
        rows, origin = capture_rows(session, model, [x, z], [z], feeds)
        result = refine_lowrank(block, rows[x], rows[z], rows[f"teacher:{z}"], origin % 2, steps)
        note = f"held-out relative squared error {result.before:.4g} -> {result.after:.4g} at step {result.steps}"
        notes.append(f"{block.name}: {note if result.kept else result.reason}")
    return notes


def _has(model: onnx.ModelProto, name: str) -> bool:
    return any(name in node.output for node in model.graph.node)
