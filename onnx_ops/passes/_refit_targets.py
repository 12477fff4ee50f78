"""Which layers distill refits, each with its sequential level, and what each is fit to.

Three kinds of MatMul/Gemm/Conv layers are refit against the teacher (the model before the plan):

* pruned: its weight is the teacher's weight of the same name with zeros where the teacher has none; the
  target is the teacher's output of that layer;
* factor: the second MatMul of a low-rank pair (``svd``: ``MatMul(MatMul(x, A), B)``, whose product, or its
  bias Add, keeps the original node's output name): its weight is not the teacher's and its target is the
  original MatMul's output in the teacher. Its input is captured at x, so that both factors can be refit
  (``_refit_factors``); the first factor is not a target of its own;
* downstream (``DistillStep.downstream``): a layer the plan did not change but that reads, through any path,
  the output of a changed one: refit on the student's own inputs so it absorbs the error upstream left.

With ``DistillStep.residual``, a MatMul/Gemm whose output (after its bias) is added to another activation
(a transformer's residual stream, ``h + f(h)``) is fit to the teacher's sum minus the student's other addend,
so that it also makes up for the error the student carries in that stream.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from onnx_ops.capture import Layer
from onnx_ops.passes._base import PassLog, constant_array
from onnx_ops.passes._layers import Linear, is_linear, linear
from onnx_ops.passes._refit_factors import first_factor, widen
from onnx_ops.plan import DistillStep

__all__ = ["Selection", "Teacher", "select", "teacher_tensors"]


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The teacher's constant weights by name and the names of all its tensors."""

    weights: dict[str, ir.Value]
    names: set[str]


@dataclasses.dataclass
class Selection:
    """The layers to refit in graph order and, per layer name, the student tensor its target is reduced by.

    Attributes:
        layers: The layers, each with its level.
        residuals: Layer name -> the student's other addend of the sum its target is (``DistillStep.residual``).
        kinds: Layer name -> "pruned", "factor" or "downstream".
        pairs: Layer name of a second factor -> its first factor's MatMul, both refit (``_refit_factors``).
    """

    layers: list[Linear]
    residuals: dict[str, str]
    kinds: dict[str, str]
    pairs: dict[str, ir.Node] = dataclasses.field(default_factory=dict)


def teacher_tensors(teacher: onnx.ModelProto) -> Teacher:
    """The teacher's constant weights by name (Constant nodes lifted as the pipeline does) and its tensor names."""
    model = ir.from_proto(teacher)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    names = {v.name for node in model.graph for v in node.outputs if v.name}
    names |= {v.name for v in model.graph.inputs if v.name}
    return Teacher(dict(model.graph.initializers), names)


def select(graph: ir.Graph, teacher: Teacher, step: DistillStep, log: PassLog) -> Selection:
    """The layers to refit, each with its sequential level (1 + the deepest refit layer upstream)."""
    depth: dict[ir.Value, int] = {}
    changed: set[ir.Value] = set()  # values that differ from the teacher's (downstream of a changed weight)
    found = Selection([], {}, {})
    for node in graph:
        level = max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        dirty = any(v in changed for v in node.inputs if v is not None)
        kind = _kind(node, teacher, step, dirty) if is_linear(node) else None
        dirty = dirty or kind in ("pruned", "factor", "first factor")
        target = _target(node, teacher, step, log) if kind in ("pruned", "factor", "downstream") else None
        if target is not None:
            level = target.level = level + 1
            found.layers.append(target)
            found.kinds[target.name] = str(kind)
            first = first_factor(target) if kind == "factor" else None
            if first is not None:  # captured on the pair's input x, so that both factors can be refit
                widen(target, first)
                found.pairs[target.name] = first
            residual = _residual(target, teacher) if step.residual else None
            if residual is not None:
                layer, other = residual
                target.layer = layer
                found.residuals[layer.name] = other
        for value in node.outputs:
            depth[value] = level
            if dirty:
                changed.add(value)
    return found


def _kind(node: ir.Node, teacher: Teacher, step: DistillStep, dirty: bool) -> str | None:
    """How this MatMul/Gemm/Conv differs from the teacher, or None when distill leaves it alone."""
    weight = node.inputs[1]
    assert weight is not None
    original = teacher.weights.get(weight.name or "")
    if original is None or original.const_value is None:  # not a teacher weight: a low-rank factor
        out = node.outputs[0]
        uses = list(out.uses())
        product = uses[0].node.outputs[0] if len(uses) == 1 and uses[0].node.op_type == "Add" else out
        return "factor" if out.name in teacher.names or product.name in teacher.names else "first factor"
    current = constant_array(weight)
    if tuple(original.const_value.shape) != current.shape:
        return None  # structured pruning: refit by recover_structured
    if np.any((current == 0) & (original.const_value.numpy() != 0)):
        return "pruned"
    return "downstream" if step.downstream and dirty else None


def _target(node: ir.Node, teacher: Teacher, step: DistillStep, log: PassLog) -> Linear | None:
    weight = node.inputs[1]
    assert weight is not None
    name = node.name or weight.name or "?"
    current = constant_array(weight)
    reason = None
    if node.name in step.exclude_nodes:
        reason = "excluded by the plan"
    elif current.size < step.min_elements:
        reason = f"weight has {current.size} elements (< min_elements {step.min_elements})"
    elif len(weight.uses()) != 1:
        reason = "weight is shared with other nodes"
    found = reason or linear(node)
    if isinstance(found, str):
        log.skip(name, found)
        return None
    if found.layer.output not in teacher.names:
        log.skip(name, f"the teacher has no tensor {found.layer.output!r} to compare with")
        return None
    return found


def _residual(target: Linear, teacher: Teacher) -> tuple[Layer, str] | None:
    """The layer re-aimed at the residual sum its output joins, and the other addend's name; None without one."""
    if target.layer.conv is not None:
        return None
    out = next(v for n in [target.node, *_bias_add(target)] for v in n.outputs if v.name == target.layer.output)
    uses = list(out.uses())
    graph = target.node.graph
    if len(uses) != 1 or (graph is not None and out in graph.outputs):
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other, total = add.inputs[1 - uses[0].idx], add.outputs[0]
    if other is None or other.const_value is not None or not other.name or total.name not in teacher.names:
        return None
    if other.shape is not None and out.shape is not None and other.shape != out.shape:
        return None  # broadcast: the rows would not align
    return dataclasses.replace(target.layer, output=total.name or ""), other.name


def _bias_add(target: Linear) -> list[ir.Node]:
    """The Add that holds the layer's bias, when the bias is a following Add's constant."""
    if target.bias is None or target.node.op_type != "MatMul":
        return []
    return [use.node for use in target.node.outputs[0].uses()]
