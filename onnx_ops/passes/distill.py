"""Label-free recovery of pruned MatMul/Gemm layers: closed-form refit to the original model's layer outputs.

The model before the plan is the teacher and the calibration feeds are the data. For every MatMul/Gemm
whose constant weight was pruned (zeros where the teacher's weight of the same name has none), the weights
pruning kept are refit, output column by output column, by ridge least squares:
``w_j[m_j] = (X_m^T X_m + lambda I)^-1 X_m^T y_j`` with X the student's layer inputs, y_j the teacher's
layer output and m_j the column's kept inputs. Zeros stay zero, so unstructured and N:M patterns are
kept exactly. A bias (Gemm's C, or a constant Add right after a MatMul) is refit with the weights.

Sequential mode refits the layers level by level in graph order, running the student again after each
level, so a layer is fit on the inputs its already refit upstream layers produce. Layers that structured
pruning shrank are refit first, by ``_structured_refit``. Conv layers that keep their shape and SVD factors
are not handled yet.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common
from threadpoolctl import threadpool_limits

from onnx_ops.capture import Layer, LayerStats, OutputError, Session, capture, output_error
from onnx_ops.errors import PlanError
from onnx_ops.passes._base import Feed, PassContext, PassLog, constant_array, is_constant_weight, set_constant
from onnx_ops.passes._structured_refit import recover_structured
from onnx_ops.plan import DistillStep
from onnx_ops.report import LayerChange

__all__ = ["DistillPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Target:
    """One pruned layer: its tensors, how its weight is oriented and scaled, and its sequential level."""

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    layer: Layer
    transposed: bool  # Gemm transB=1: the stored weight is [n, k]
    alpha: float
    beta: float
    level: int = 0


class DistillPass(ir.passes.InPlacePass):
    """Refit pruned MatMul/Gemm layers to the teacher's layer outputs as one DistillStep says."""

    def __init__(self, step: DistillStep, context: PassContext) -> None:
        super().__init__()
        self.step = step
        self.context = context
        self.log = PassLog()

    def precheck(self, model: ir.Model) -> None:
        """Refuse a step without calibration data or without any MatMul/Gemm with a constant weight.

        Raises:
            PlanError: What is missing.
        """
        if not self.context.calibration:
            raise PlanError("distill needs calibration data: give a .npz with one array per model input")
        if self.context.teacher is None:
            raise PlanError("distill needs the model before the plan as its teacher")
        if not any(_linear(node) or node.op_type == "Conv" for node in model.graph):
            raise PlanError("distill finds no MatMul or Gemm layer with a constant 2-D float weight")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Refit in place; ``modified`` is False when no layer was pruned or no refit lowered the error."""
        self.precheck(model)
        teacher = self.context.teacher
        feeds = list(self.context.calibration or [])
        assert teacher is not None
        structured = recover_structured(model, teacher, feeds, self.step, self.log)  # layers that changed shape
        targets = _targets(model.graph, _teacher_tensors(teacher), self.step, self.log)
        if not targets and structured:
            return ir.passes.PassResult(model, modified=True)
        if not targets:
            self.log.warnings.append("distill found no pruned MatMul/Gemm layer to recover; the model is unchanged")
            return ir.passes.PassResult(model, modified=False)
        levels = sorted({t.level for t in targets}) if self.step.sequential else [0]
        # Many small solves: one BLAS thread each is far faster than threads that wait on a busy machine.
        with threadpool_limits(limits=1, user_api="blas"):
            # One teacher session outputs every target layer's output: the teacher does not change.
            session = Session(teacher, [t.layer.output for t in targets])
            before, refit = self._levels(session, model, targets, levels, feeds)
        after = output_error(session, ir.to_proto(model), feeds)
        self.log.summary.update(
            layers_refit=refit,
            levels=len(levels),
            calibration_feeds=len(feeds),
            model_rel_error_before=before.relative,
            model_rel_error_after=after.relative,
        )
        logger.info("distill: %s", self.log.summary)
        return ir.passes.PassResult(model, modified=refit > 0)

    def _levels(
        self, teacher: Session, model: ir.Model, targets: list[_Target], levels: list[int], feeds: list[Feed]
    ) -> tuple[OutputError, int]:
        """Capture and refit level by level; the model's output error before any refit, and the layers refit."""
        before: OutputError | None = None
        refit = 0
        for level in levels:
            group = [t for t in targets if t.level == level or not self.step.sequential]
            stats, error = capture(teacher, ir.to_proto(model), [t.layer for t in group], feeds)
            before = error if before is None else before
            for target in group:
                refit += _refit(target, stats[target.layer.name], self.step.damping, self.log)
        assert before is not None
        return before, refit


def _linear(node: ir.Node) -> bool:
    """A MatMul/Gemm of an activation by a constant 2-D float32 weight."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight, act = node.inputs[1], node.inputs[0]
    return (
        is_constant_weight(weight)
        and weight is not None
        and weight.const_value is not None
        and weight.const_value.dtype == ir.DataType.FLOAT
        and len(weight.const_value.shape) == 2
        and act is not None
        and act.const_value is None
    )


def _teacher_tensors(teacher: onnx.ModelProto) -> tuple[dict[str, ir.Value], set[str]]:
    """The teacher's constant weights by name (Constant nodes lifted as the pipeline does) and its tensor names."""
    model = ir.from_proto(teacher)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    names = {v.name for node in model.graph for v in node.outputs if v.name}
    names |= {v.name for v in model.graph.inputs if v.name}
    return dict(model.graph.initializers), names


def _targets(
    graph: ir.Graph, teacher: tuple[dict[str, ir.Value], set[str]], step: DistillStep, log: PassLog
) -> list[_Target]:
    """The pruned layers, each with its sequential level (1 + the deepest pruned layer upstream)."""
    weights, names = teacher
    depth: dict[ir.Value, int] = {}
    targets: list[_Target] = []
    for node in graph:
        level = max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        target = _target(node, weights, names, step, log) if _linear(node) else None
        if target is not None:
            level = target.level = level + 1
            targets.append(target)
        for value in node.outputs:
            depth[value] = level
    return targets


def _target(
    node: ir.Node, weights: dict[str, ir.Value], names: set[str], step: DistillStep, log: PassLog
) -> _Target | None:
    weight, act = node.inputs[1], node.inputs[0]
    assert weight is not None and act is not None and weight.const_value is not None
    name = node.name or weight.name or "?"
    original = weights.get(weight.name or "")
    current = constant_array(weight)
    if original is None or original.const_value is None:
        return None  # not a teacher weight (e.g. an SVD factor): nothing to recover
    if tuple(original.const_value.shape) != current.shape:
        return None  # structured pruning: refit by recover_structured
    if not np.any((current == 0) & (original.const_value.numpy() != 0)):
        return None  # not pruned
    attrs = {a.name: a.value for a in node.attributes.values()}
    transposed = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
    k, n = current.shape[::-1] if transposed else current.shape
    reason = None
    if node.name in step.exclude_nodes:
        reason = "excluded by the plan"
    elif current.size < step.min_elements:
        reason = f"weight has {current.size} elements (< min_elements {step.min_elements})"
    elif len(weight.uses()) != 1:
        reason = "weight is shared with other nodes"
    elif node.op_type == "Gemm" and attrs.get("transA", 0):
        reason = "Gemm with transA=1 is not handled"
    elif node.op_type == "Gemm" and float(attrs.get("alpha", 1.0)) == 0.0:
        reason = "Gemm with alpha=0"
    if reason:
        log.skip(name, reason)
        return None
    bias, output = _bias(node, n)
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and bias is None:
        log.skip(name, "Gemm bias C is not a constant vector used only here")
        return None
    if output.name not in names:
        log.skip(name, f"the teacher has no tensor {output.name!r} to compare with")
        return None
    layer = Layer(name=name, input=act.name or "", output=output.name or "", k=int(k), n=int(n))
    alpha = float(attrs.get("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
    beta = float(attrs.get("beta", 1.0)) if node.op_type == "Gemm" else 1.0
    return _Target(node, weight, bias, layer, transposed, alpha, beta)


def _bias(node: ir.Node, n: int) -> tuple[ir.Value | None, ir.Value]:
    """The layer's constant bias vector (Gemm C, or a following Add's constant) and the tensor it ends in."""
    out = node.outputs[0]
    if node.op_type == "Gemm":
        c = node.inputs[2] if len(node.inputs) > 2 else None
        return (c if _vector(c, n) else None), out
    uses = list(out.uses())
    graph = node.graph
    if len(uses) != 1 or (graph is not None and out in graph.outputs):
        return None, out
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, out
    other = add.inputs[1 - uses[0].idx]
    if not _vector(other, n):
        return None, out
    return other, add.outputs[0]


def _vector(value: ir.Value | None, n: int) -> bool:
    """A constant float32 tensor of n values along its last axis only, used by one node."""
    if value is None or not is_constant_weight(value) or value.const_value is None:
        return False
    shape = value.const_value.numpy().shape
    return (
        value.const_value.dtype == ir.DataType.FLOAT
        and len(shape) >= 1
        and shape[-1] == n
        and math.prod(shape) == n
        and len(value.uses()) == 1
    )


def _refit(target: _Target, stats: LayerStats, damping: float, log: PassLog) -> int:
    """Refit one layer from its statistics; 1 if the new weights lower the layer's error, else 0."""
    layer = target.layer
    stored = constant_array(target.weight)
    w = (stored.T if target.transposed else stored).astype(np.float64) * target.alpha
    current = np.zeros((layer.k + 1, layer.n))
    current[:-1] = w
    fit_bias = target.bias is not None and target.beta != 0.0
    if fit_bias:
        assert target.bias is not None
        current[-1] = constant_array(target.bias).reshape(-1) * target.beta
    solved = solve_masked(stats, current, fit_bias, damping)
    before, after = stats.squared_error(current), stats.squared_error(solved)
    reference = max(float(stats.yty.sum()), np.finfo(np.float64).tiny)
    if not np.all(np.isfinite(solved)) or after >= before:
        log.skip(layer.name, f"the refit did not lower the layer's error ({before / reference:.3g})")
        return 0
    new_w = solved[:-1] / target.alpha
    set_constant(target.weight, (new_w.T if target.transposed else new_w).astype(np.float32))
    if fit_bias and target.bias is not None:
        shape = target.bias.const_value.shape if target.bias.const_value is not None else (layer.n,)
        set_constant(target.bias, (solved[-1] / target.beta).astype(np.float32).reshape(tuple(shape)))
    log.layers.append(
        LayerChange(
            name=layer.name,
            op_type=target.node.op_type,
            weight=target.weight.name or "?",
            shape_before=list(stored.shape),
            shape_after=list(stored.shape),
            params_before=int(stored.size),
            params_after=int(stored.size),
            sparsity=float(np.mean(new_w == 0)),
            note=f"layer output relative squared error {before / reference:.4g} -> {after / reference:.4g} "
            f"(level {target.level}, {stats.rows} rows)",
        )
    )
    return 1


def solve_masked(stats: LayerStats, prior: np.ndarray, bias: bool, damping: float) -> np.ndarray:
    """Ridge least squares per output column over its kept inputs; [k + 1, n] with zeros where prior has.

    The ridge pulls the weights towards the pruned ones rather than towards zero, so an input direction the
    calibration data never excites (a dead unit) keeps its weight instead of losing it.

    Args:
        stats: The layer's statistics (X with a trailing column of ones).
        prior: [k + 1, n] the current weights (last row: the bias); its zeros in the first k rows are the mask.
        bias: Also fit the bias row (the last row of the result); else it stays zero.
        damping: Ridge term relative to the mean of diag(X^T X) over the k inputs (the bias is not damped).
    """
    k, n = prior.shape[0] - 1, prior.shape[1]
    mask = prior[:-1] != 0
    diagonal = np.diag(stats.xtx)[:k]
    ridge = np.zeros(k + 1)
    ridge[:k] = max(damping * float(diagonal.mean()) if k else 0.0, 1e-12 * max(float(diagonal.max(initial=0)), 1.0))
    gram = stats.xtx + np.diag(ridge)
    target = stats.xty + ridge[:, None] * prior
    result = np.zeros((k + 1, n))
    patterns, inverse = np.unique(mask.T, axis=0, return_inverse=True)
    for group, pattern in enumerate(patterns):
        columns = np.flatnonzero(inverse.reshape(-1) == group)
        rows = np.flatnonzero(pattern)
        if bias:
            rows = np.append(rows, k)
        if rows.size == 0:
            continue
        rhs = target[np.ix_(rows, columns)]
        sub = gram[np.ix_(rows, rows)]
        try:
            result[np.ix_(rows, columns)] = np.linalg.solve(sub, rhs)
        except np.linalg.LinAlgError:
            result[np.ix_(rows, columns)] = np.linalg.lstsq(sub, rhs, rcond=None)[0]
    return result
