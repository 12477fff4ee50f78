"""Recovery of structured pruning: refit each shrunk layer to the original model's outputs, closed form.

Structured pruning removes output channels of a layer (a Conv's filters, a MatMul's neurons) and the
matching input channels of its consumers. Whatever a removed channel contributed to a consumer's output
is lost, but much of it is correlated with the channels that stay. For every MatMul/Gemm/Conv whose
weight changed shape, this module refits the weight it kept (and its bias) by ridge least squares so the
layer's output on the calibration inputs matches the teacher's (the model before the plan), on the
output channels the layer still has: ``W = (X^T X + lambda I)^-1 (X^T Y + lambda W_pruned)``, X the
student's layer inputs (a Conv's as sampled im2col patches, see ``onnx_ops.capture``) and Y the teacher's
layer output. The removed channels' contribution is thus re-expressed by the channels that stay plus the
bias; a Conv without a bias gets one. Which teacher channels a layer still has comes from
``_structured.KEPT``, recorded by the prune step.

Layers are refit level by level in graph order (sequential mode), each on the inputs its already refit
upstream layers produce, so errors do not pile up.

A layer after a global pool sees one row per calibration input, often fewer rows than it has weights, and
a least-squares fit there interpolates the calibration data. So the ridge term is chosen by two-fold
cross-validation over the calibration feeds (even and odd feeds): among ``damping * 10^j``, j = -1..3, the
one whose fit on one half best predicts the other half; a layer whose cross-validated error no ridge term
lowers below the pruned layer's is left as pruned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from threadpoolctl import threadpool_limits

from onnx_ops.capture import ConvGeometry, Layer, LayerStats, OutputError, Session, capture, output_error
from onnx_ops.passes._base import Feed, PassLog, constant_array, is_constant_weight, set_constant
from onnx_ops.passes._layers import layer_bias
from onnx_ops.passes._structured import KEPT
from onnx_ops.passes._structured_ridge import RidgePath, cross_validate
from onnx_ops.plan import DistillStep
from onnx_ops.report import LayerChange

__all__ = ["recover_structured"]

_POSITIONS = 1024  # Conv output positions sampled per calibration feed


@dataclasses.dataclass
class _Target:
    """One layer whose weight was shrunk, seen as ``out = X @ W + b`` with W [k, n]."""

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    layer: Layer
    kept: np.ndarray  # the teacher's output channels this layer still computes
    out_axis: int  # output-channel axis of the stored weight
    scale: float = 1.0  # Gemm alpha
    bias_scale: float = 1.0  # Gemm beta
    level: int = 0

    def matrix(self) -> np.ndarray:
        """The stored weight as [k, n] float64, scaled."""
        w = np.moveaxis(constant_array(self.weight).astype(np.float64), self.out_axis, -1)
        return w.reshape(-1, w.shape[-1]) * self.scale

    def store(self, matrix: np.ndarray) -> None:
        """Write a [k, n] matrix back in the stored layout."""
        shape = np.moveaxis(np.empty(constant_array(self.weight).shape, dtype=bool), self.out_axis, -1).shape
        w = np.moveaxis((matrix / self.scale).reshape(shape), -1, self.out_axis)
        set_constant(self.weight, w.astype(np.float32))


def recover_structured(
    model: ir.Model, teacher: onnx.ModelProto, feeds: Sequence[Feed], step: DistillStep, log: PassLog
) -> int:
    """Refit every layer whose weight shape differs from the teacher's; the number of layers refit.

    Adds ``structured_layers_refit`` and the model's relative output error before and after to
    ``log.summary`` when there is such a layer.
    """
    shapes = _teacher_shapes(teacher)
    targets = _targets(model.graph, shapes, step, log)
    if not targets:
        return 0
    levels = sorted({t.level for t in targets}) if step.sequential else [0]
    session = Session(teacher, [t.layer.output for t in targets])
    halves = [feeds[0::2], feeds[1::2]] if len(feeds) >= 2 else [feeds]
    before: OutputError | None = None
    refit = 0
    for level in levels:
        group = [t for t in targets if t.level == level or not step.sequential]
        # The IR model itself: a large one goes to ONNX Runtime through a file it maps, not a proto copy.
        parts = [capture(session, model, [t.layer for t in group], half, positions=_POSITIONS) for half in halves]
        if before is None:
            before = OutputError(sum(p[1].squared_error for p in parts), sum(p[1].reference for p in parts))
        # One BLAS thread: on a busy machine, threads that wait for each other make a solve 5-10x slower.
        with threadpool_limits(limits=1, user_api="blas"):
            for target in group:
                refit += _refit(target, [p[0][target.layer.name] for p in parts], step.damping, log)
    after = output_error(session, model, feeds)
    assert before is not None
    log.summary.update(
        structured_layers_refit=refit,
        structured_rel_error_before=before.relative,
        structured_rel_error_after=after.relative,
    )
    return refit


def _teacher_shapes(teacher: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of the teacher's constant tensors (initializers and Constant-node values) by name."""
    shapes = {t.name: tuple(t.dims) for t in teacher.graph.initializer}
    for node in teacher.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes.setdefault(node.output[0], tuple(node.attribute[0].t.dims))
    return shapes


def _targets(graph: ir.Graph, shapes: dict[str, tuple[int, ...]], step: DistillStep, log: PassLog) -> list[_Target]:
    """The shrunk layers in graph order, each with its level (1 + the deepest shrunk layer upstream)."""
    depth: dict[ir.Value, int] = {}
    targets: list[_Target] = []
    for node in graph:
        level = max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        found = _target(node, shapes, step, log)
        if found is not None:
            level = found.level = level + 1
            targets.append(found)
        for value in node.outputs:
            depth[value] = level
    return targets


def _target(node: ir.Node, shapes: dict[str, tuple[int, ...]], step: DistillStep, log: PassLog) -> _Target | None:
    if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    act, weight = node.inputs[0], node.inputs[1]
    if act is None or weight is None or not is_constant_weight(weight) or weight.name not in shapes:
        return None
    w = constant_array(weight)
    if tuple(w.shape) == shapes[weight.name or ""]:
        return None  # not structurally pruned (distill's per-row refit handles zeros)
    name = node.name or weight.name or "?"
    attrs = node.attributes
    out_axis = {"Conv": 0, "MatMul": w.ndim - 1, "Gemm": 0 if attrs.get_int("transB", 0) else 1}[node.op_type]
    reason = _refusal(node, w, step)
    kept = dict(weight.meta.get(KEPT, {})).get(out_axis)
    teacher_n = shapes[weight.name or ""][out_axis]
    if kept is None and w.shape[out_axis] == teacher_n:
        kept = np.arange(teacher_n)
    if reason is None and kept is None:
        reason = "its output channels changed but the prune step did not record which were kept"
    if reason:
        log.skip(name, reason)
        return None
    bias, output = layer_bias(node, w.shape[out_axis])
    conv = None
    if node.op_type == "Conv":
        conv = ConvGeometry.from_attributes({a.name: a.value for a in attrs.values()}, tuple(w.shape))
    k = int(w.size // w.shape[out_axis])
    layer = Layer(name=name, input=act.name or "", output=output.name or "", k=k, n=teacher_n, conv=conv)
    scale = attrs.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
    beta = attrs.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
    return _Target(node, weight, bias, layer, np.asarray(kept), out_axis, scale, beta)


def _refusal(node: ir.Node, w: np.ndarray, step: DistillStep) -> str | None:
    attrs = node.attributes
    if node.name in step.exclude_nodes:
        return "excluded by the plan"
    if w.dtype != np.float32:
        return f"weight is {w.dtype}, not float32"
    if w.size < step.min_elements:
        return f"weight has {w.size} elements (< min_elements {step.min_elements})"
    if node.inputs[1] is not None and len(node.inputs[1].uses()) != 1:
        return "weight is shared with other nodes"
    if node.op_type == "Conv" and attrs.get_int("group", 1) != 1:
        return "grouped or depthwise Conv: its channels are refit through its consumer"
    if node.op_type == "MatMul" and w.ndim != 2:
        return "MatMul weight is not 2-D"
    if node.op_type == "Gemm" and (attrs.get_int("transA", 0) != 0 or attrs.get_float("alpha", 1.0) == 0.0):
        return "Gemm with transA=1 or alpha=0 is not handled"
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = node.inputs[2]
        if not is_constant_weight(c) or len(c.uses()) != 1:
            return "Gemm bias C is not a constant used only here"
    return None


def _refit(target: _Target, halves: list[LayerStats], damping: float, log: PassLog) -> int:
    """Refit one layer from its statistics on each half of the feeds; 1 if it was refit, else 0."""
    kept = target.kept
    parts = [LayerStats(s.xtx, s.xty[:, kept], s.yty[kept], s.rows) for s in halves]
    whole = LayerStats(
        np.sum([p.xtx for p in parts], axis=0),
        np.sum([p.xty for p in parts], axis=0),
        np.sum([p.yty for p in parts], axis=0),
        sum(p.rows for p in parts),
    )
    w = target.matrix()
    current = np.zeros((w.shape[0] + 1, w.shape[1]))
    current[:-1] = w
    if target.bias is not None:
        current[-1] = constant_array(target.bias).reshape(-1) * target.bias_scale
    fit_bias = target.bias is not None or target.node.op_type == "Conv"  # a Conv without a bias gets one
    before = whole.squared_error(current)
    reference = max(float(whole.yty.sum()), np.finfo(np.float64).tiny)
    lam, held_out = cross_validate(parts, current, fit_bias, damping)
    name = target.layer.name
    solved = RidgePath(whole, current, fit_bias).solve(lam) if held_out < before else current
    after = whole.squared_error(solved)
    if held_out >= before or not np.all(np.isfinite(solved)) or after >= before:
        log.skip(name, f"the structured refit did not lower the layer's held-out error ({before / reference:.3g})")
        return 0
    target.store(solved[:-1])
    if fit_bias:
        _store_bias(target, solved[-1] / target.bias_scale)
    shape = list(constant_array(target.weight).shape)
    log.layers.append(
        LayerChange(
            name=name,
            op_type=target.node.op_type,
            weight=target.weight.name or "?",
            shape_before=shape,
            shape_after=shape,
            params_before=int(np.prod(shape)),
            params_after=int(np.prod(shape)),
            note=f"structured refit: layer output relative squared error {before / reference:.4g} -> "
            f"{after / reference:.4g} ({held_out / reference:.4g} cross-validated, damping {lam:g}) on "
            f"{len(kept)} of {target.layer.n} channels (level {target.level}, {whole.rows} rows)",
        )
    )
    return 1


def _store_bias(target: _Target, bias: np.ndarray) -> None:
    if target.bias is not None:
        set_constant(target.bias, bias.astype(np.float32).reshape(constant_array(target.bias).shape))
        return
    graph = target.node.graph
    assert graph is not None
    value = ir.Value(name=f"{target.weight.name}_structured_bias")
    set_constant(value, bias.astype(np.float32))
    graph.register_initializer(value)
    target.node.resize_inputs(3)
    target.node.replace_input_with(2, value)
    target.bias = value
