"""The weights a prune step selects, why others are skipped, and the report entry of one pruned weight."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnx_ops.passes._base import PassLog, constant_array, is_constant_weight, non_finite_reason
from onnx_ops.plan import PruneStep
from onnx_ops.report import LayerChange

__all__ = ["Target", "collect", "layer_change", "nm_reason", "none_found"]

# Inputs that hold weights, per op type (LSTM/GRU/RNN: W and R).
_WEIGHT_SLOTS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})


@dataclasses.dataclass
class Target:
    """One weight tensor to prune, with the nodes that use it and its input (reduction) axis."""

    weight: ir.Value
    nodes: list[ir.Node]
    axis: int | None

    @property
    def name(self) -> str:
        """The first node's name (else the weight's), as the log and the errors name this target."""
        return self.nodes[0].name or self.weight.name or "?"


def collect(graph: ir.Graph, step: PruneStep, log: PassLog) -> list[Target]:
    """Constant float weights of the selected nodes, deduplicated when several nodes share one."""
    targets: dict[ir.Value, Target] = {}
    blocked: set[ir.Value] = set()
    for node in graph:
        if node.op_type not in step.op_types or node.domain not in ("", "ai.onnx"):
            continue
        if step.only_nodes and node.name not in step.only_nodes:
            continue
        for slot in _WEIGHT_SLOTS[node.op_type]:
            weight = node.inputs[slot] if slot < len(node.inputs) else None
            if weight is None or not is_constant_weight(weight):
                continue  # activations (e.g. attention MatMuls) are not candidates: no log entry
            reason = _reject_reason(node, weight, step)
            if reason:
                log.skip(node.name or weight.name or "?", reason)
                if node.name in step.exclude_nodes:
                    blocked.add(weight)
                continue
            axis = _reduction_axis(node, weight)
            if weight in targets:
                target = targets[weight]
                target.nodes.append(node)
                target.axis = target.axis if target.axis == axis else None
            else:
                targets[weight] = Target(weight, [node], axis)
    for weight in blocked & targets.keys():
        log.skip(targets.pop(weight).name, f"weight {weight.name!r} is shared with an excluded node")
    return list(targets.values())


def none_found(step: PruneStep) -> str:
    """What the step looked for and did not find, for the error that refuses it."""
    kinds = "/".join(step.op_types)
    among = f" among only_nodes {step.only_nodes}" if step.only_nodes else ""
    return f"no constant float weight of {kinds} with at least {step.min_elements} elements{among}"


def _reject_reason(node: ir.Node, weight: ir.Value, step: PruneStep) -> str | None:
    if node.name in step.exclude_nodes:
        return "in exclude_nodes"
    if weight.dtype not in _FLOATS:
        return f"weight {weight.name!r} has type {weight.dtype}, not float"
    if reason := non_finite_reason(weight):
        return reason
    size = constant_array(weight).size
    if size < step.min_elements:
        return f"weight {weight.name!r} has {size} elements, fewer than min_elements={step.min_elements}"
    return None


def _reduction_axis(node: ir.Node, weight: ir.Value) -> int:
    """The axis of the weight that is summed over when the node runs (the input dimension)."""
    ndim = constant_array(weight).ndim
    if node.op_type == "MatMul":
        return ndim - 2 if ndim >= 2 else 0
    if node.op_type == "Gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    if node.op_type == "Conv":
        return 1
    return ndim - 1  # LSTM/GRU/RNN: W[dirs, gates*H, input], R[dirs, gates*H, H]


def nm_reason(target: Target, m: int) -> str | None:
    """Why n:m pruning with group size ``m`` skips this target, or None when it can prune it."""
    if target.axis is None:
        return "weight is shared by nodes that reduce it along different axes"
    size = constant_array(target.weight).shape[target.axis]
    if size % m:
        return f"input dimension {size} is not divisible by m={m}"
    return None


def layer_change(
    node: ir.Node, weight: ir.Value, before: np.ndarray, after: np.ndarray, rel_error: float, note: str | None
) -> LayerChange:
    """The report entry of one pruned weight (``before`` and ``after`` its values)."""
    return LayerChange(
        name=node.name or weight.name or "?",
        op_type=node.op_type,
        weight=weight.name or "?",
        shape_before=list(before.shape),
        shape_after=list(after.shape),
        params_before=int(before.size),
        params_after=int(after.size),
        sparsity=float(np.count_nonzero(after == 0) / after.size) if after.size else 0.0,
        rank=None,
        rel_error=rel_error,
        note=note,
    )
