"""Magnitude pruning of MatMul, Gemm, Conv and recurrent weights: unstructured, N:M or structured.

With criterion "activation", unstructured and N:M pruning weigh each weight by the norm of the input it
multiplies over the calibration data (Wanda; see ``_masks``) and compare within each output row.

* unstructured: zero the smallest-magnitude weights, with one threshold per tensor or one global
  threshold over all selected tensors. The global threshold compares plain magnitudes, so layers
  whose weights have a small scale lose more weights than others; that is what users of "global
  magnitude pruning" expect, and nothing is normalized.
* n:m: in every group of ``m`` consecutive weights along the input (reduction) dimension keep the
  ``n`` largest. A tensor whose input dimension is not divisible by ``m`` is skipped (no remainder
  groups, which would break the pattern that sparse kernels need).
* structured: remove whole output neurons/channels and shrink every consumer (see ``_structured``).

Unstructured and N:M sparsity keep tensors dense, so ONNX Runtime on CPU runs no faster; only the
gzip-compressed file gets smaller. Structured pruning really makes the model smaller and faster.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_ops.errors import PlanError
from onnx_ops.passes import _masks, _prune_allocation, _structured, _structured_scores
from onnx_ops.passes._base import (
    Feed,
    PassContext,
    PassLog,
    constant_array,
    is_constant_weight,
    non_finite_reason,
    release_proto,
    set_constant,
    sum_squares,
)
from onnx_ops.plan import PruneStep
from onnx_ops.report import LayerChange

__all__ = ["MagnitudePrunePass"]

logger = logging.getLogger(__name__)

# Inputs that hold weights, per op type (LSTM/GRU/RNN: W and R).
_WEIGHT_SLOTS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})
_DENSE_WARNING = (
    "{method} sparsity does not make ONNX Runtime CPU inference faster: the weights stay dense tensors "
    "full of zeros. It only shrinks the gzip-compressed size of the model file."
)


class MagnitudePrunePass(ir.passes.InPlacePass):
    """Prune the weights of MatMul, Gemm, Conv and LSTM/GRU/RNN nodes as one PruneStep says.

    The pass fills ``self.log`` with one LayerChange per changed weight, the skipped candidates with
    their reasons, warnings, and totals in ``log.summary``.
    """

    def __init__(self, step: PruneStep, context: PassContext) -> None:
        super().__init__()
        self.step = step
        self.context = context
        self.log = PassLog()

    def precheck(self, model: ir.Model) -> None:
        """Refuse a step that cannot prune anything in this model.

        Raises:
            PlanError: No weight of the selected op types is large enough, divisible by m (n:m),
                or structurally prunable (structured).
        """
        step, scratch = self.step, PassLog()
        if step.criterion == "activation" and not self.context.calibration:
            raise PlanError(
                "prune with criterion 'activation' needs calibration data (it weighs each weight by its input's "
                "norm): give a .npz with one array per model input, or use criterion 'magnitude'"
            )
        targets = _collect(model.graph, step, scratch)
        if step.method == "structured":
            traces = [_trace_target(t, step) for t in targets]
            if not any(isinstance(t, _structured.Trace) for t in traces):
                reasons = "; ".join(
                    dict.fromkeys(f"{t.name}: {r}" for t, r in zip(targets, traces, strict=True) if isinstance(r, str))
                )
                raise PlanError(f"structured pruning finds no layer it can shrink ({reasons or _none(step)})")
            return
        if step.method == "n:m" and targets and all(_nm_reason(t, step.m) for t in targets):
            raise PlanError(f"n:m pruning finds no weight whose input dimension is divisible by m={step.m}")
        if not targets:
            skipped = "; ".join(dict.fromkeys(s.reason for s in scratch.skipped))[:300]
            raise PlanError(f"{step.method} pruning finds {_none(step)}" + (skipped and f" (skipped: {skipped})"))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Prune in place; ``modified`` is False when no weight changed."""
        if self.step.method == "structured":
            modified = _run_structured(model, self.step, self.log, self.context.calibration)
        else:
            modified = _run_dense(model, self.step, self.log, self.context)
            method = "Unstructured" if self.step.method == "unstructured" else "N:M"
            self.log.warnings.append(_DENSE_WARNING.format(method=method))
        logger.info("prune (%s): %s", self.step.method, self.log.summary)
        return ir.passes.PassResult(model, modified=modified)


@dataclasses.dataclass
class _Target:
    """One weight tensor to prune, with the nodes that use it and its input (reduction) axis."""

    weight: ir.Value
    nodes: list[ir.Node]
    axis: int | None

    @property
    def name(self) -> str:
        return self.nodes[0].name or self.weight.name or "?"


def _collect(graph: ir.Graph, step: PruneStep, log: PassLog) -> list[_Target]:
    """Constant float weights of the selected nodes, deduplicated when several nodes share one."""
    targets: dict[ir.Value, _Target] = {}
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
                targets[weight] = _Target(weight, [node], axis)
    for weight in blocked & targets.keys():
        log.skip(targets.pop(weight).name, f"weight {weight.name!r} is shared with an excluded node")
    return list(targets.values())


def _none(step: PruneStep) -> str:
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


def _nm_reason(target: _Target, m: int) -> str | None:
    if target.axis is None:
        return "weight is shared by nodes that reduce it along different axes"
    size = constant_array(target.weight).shape[target.axis]
    if size % m:
        return f"input dimension {size} is not divisible by m={m}"
    return None


def _run_dense(model: ir.Model, step: PruneStep, log: PassLog, context: PassContext) -> bool:
    """Unstructured or N:M pruning of every target; returns True if any weight changed."""
    targets = _collect(model.graph, step, log)
    if step.method == "n:m":
        reasons = [_nm_reason(t, step.m) for t in targets]
        for target, reason in zip(targets, reasons, strict=True):
            if reason:
                log.skip(target.name, reason)
        targets = [t for t, reason in zip(targets, reasons, strict=True) if not reason]
    norms: list[np.ndarray | str] = ["" for _ in targets]
    sparsities = [step.sparsity] * len(targets)
    if step.criterion == "activation":
        assert context.calibration
        weights = [(t.weight, t.nodes) for t in targets]
        if step.allocation == "uniform":
            norms = _masks.activation_norms(model, weights, context.calibration, step)
        else:
            norms, sparsities, allocated = _prune_allocation.allocate(model, weights, context.calibration, step)
            log.summary.update(allocated)
        fallback = [f"{t.name} ({s})" for t, s in zip(targets, norms, strict=True) if isinstance(s, str)]
        if fallback:
            log.warnings.append(f"{len(fallback)} weights were pruned by magnitude: {'; '.join(fallback)}"[:600])
        log.summary["criterion"] = "activation"
    cut = None
    if step.method == "unstructured" and step.scope == "global":
        cut = _masks.global_cut(lambda: (constant_array(t.weight) for t in targets), step.sparsity)
    modified, zeros, total = False, 0, 0
    for target, norm, sparsity in zip(targets, norms, sparsities, strict=True):  # one weight at a time
        before = constant_array(target.weight)
        score = norm if isinstance(norm, str) else _masks.activation_scores(target.nodes[0], before, norm)
        layer_step = step if sparsity == step.sparsity else step.model_copy(update={"sparsity": sparsity})
        mask = _masks.mask(layer_step, before, (target.nodes[0], target.axis), score, cut)
        del score
        pruned = before[mask]
        zeros += int(np.count_nonzero(mask)) + int(np.count_nonzero(before == 0)) - int(np.count_nonzero(pruned == 0))
        total += before.size
        if not np.any(pruned != 0):
            continue  # already pruned (e.g. the same step run twice)
        after = np.where(mask, np.zeros((), before.dtype), before)
        del mask
        rel_error = float(np.sqrt(sum_squares(pruned) / (sum_squares(before) or 1.0)))
        set_constant(target.weight, after)
        modified = True
        note = f"shared by {', '.join(n.name or '?' for n in target.nodes)}" if len(target.nodes) > 1 else None
        log.layers.append(_layer_change(target.nodes[0], target.weight, before, after, rel_error, note))
        del before, after, pruned
    release_proto(model)
    target_sparsity = 1 - step.n / step.m if step.method == "n:m" else step.sparsity
    log.summary.update(
        method=step.method,
        weights_pruned=len(targets),
        target_sparsity=round(target_sparsity, 6),
        achieved_sparsity=round(zeros / total, 6) if total else 0.0,
    )
    if step.method == "unstructured":
        log.summary["scope"] = step.scope
    return modified


def _layer_change(
    node: ir.Node, weight: ir.Value, before: np.ndarray, after: np.ndarray, rel_error: float, note: str | None
) -> LayerChange:
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


def _trace_target(target: _Target, step: PruneStep) -> _structured.Trace | str:
    """Trace one candidate producer, or return why it is not structurally pruned."""
    node = target.nodes[0]
    if node.op_type not in _structured.PRODUCERS:
        return f"{node.op_type} is not structurally pruned (only MatMul, Gemm and Conv are)"
    if len(target.nodes) > 1:
        return f"weight {target.weight.name!r} is shared by {len(target.nodes)} nodes"
    found = _structured.trace(node, set(step.exclude_nodes))
    if isinstance(found, str):
        return found
    if _structured.removed_count(found.channels, step.sparsity, _multiple(found, step)) < 1 or found.channels < 2:
        return f"sparsity {step.sparsity} of {found.channels} channels removes none"
    return found


def _multiple(found: _structured.Trace, step: PruneStep) -> int:
    """Conv layers keep a multiple of ``step.channel_multiple`` channels (see _structured.removed_count)."""
    return step.channel_multiple if found.producer.op_type == "Conv" else 1


def _run_structured(model: ir.Model, step: PruneStep, log: PassLog, feeds: Sequence[Feed] | None = None) -> bool:
    """Remove output channels layer by layer in graph order; returns True if any layer changed.

    With calibration feeds, the channels removed are those sending the least energy into their consumers.
    """
    graph = model.graph
    traced = [_trace_target(t, step) for t in _collect(graph, step, PassLog())] if feeds else []
    energy = _structured_scores.channel_energy(model, [t for t in traced if not isinstance(t, str)], feeds or [])
    removed_total = channels_total = layers = 0
    params_before = _parameters(graph)
    history: dict[ir.Value, tuple[ir.Node, np.ndarray, list[str]]] = {}  # weight -> node, original, notes
    skipped: set[ir.Node] = set()
    for target in _collect(graph, step, log):
        # Trace right before slicing: an earlier layer may have shrunk this node's input dimension.
        found = _trace_target(target, step)
        if isinstance(found, str):
            if target.nodes[0] not in skipped:  # LSTM/GRU/RNN have two weights but deserve one entry
                log.skip(target.name, found)
                skipped.add(target.nodes[0])
            continue
        count = _structured.removed_count(found.channels, step.sparsity, _multiple(found, step))
        removed = _structured_scores.removed_channels(found, count, step.norm, energy)
        for node, weight, note in _notes(found, len(removed), step):
            history.setdefault(weight, (node, constant_array(weight), []))[2].append(note)
        _structured.apply(found, removed)
        removed_total, channels_total, layers = (
            removed_total + len(removed),
            channels_total + found.channels,
            layers + 1,
        )
    for weight, (node, original, notes) in history.items():
        after = constant_array(weight)
        # W' is a sub-tensor of W, so the removed part has norm sqrt(||W||^2 - ||W'||^2).
        total, kept = (float(np.sum(np.square(a, dtype=np.float64))) for a in (original, after))
        rel = float(np.sqrt(max(total - kept, 0.0) / total)) if total else 0.0
        log.layers.append(_layer_change(node, weight, original, after, rel, "; ".join(notes)))
    log.summary.update(
        method="structured",
        layers_pruned=layers,
        target_sparsity=step.sparsity,
        selection="activation" if energy else "magnitude",
        neurons_removed=removed_total,
        neurons_before=channels_total,
        achieved_sparsity=round(removed_total / channels_total, 6) if channels_total else 0.0,
        params_removed=params_before - _parameters(graph),
    )
    return layers > 0


def _notes(found: _structured.Trace, removed: int, step: PruneStep) -> list[tuple[ir.Node, ir.Value, str]]:
    """What happens to the producer's weight and to each consumer's weight, for LayerChange.note."""
    consumers = ", ".join(node.name or "?" for node, _, _ in found.consumers)
    producer = found.producer.name or found.weight.name or "?"
    own = (
        f"removed {removed} of {found.channels} output channels ({step.norm} norm), sliced "
        f"{len(found.constants)} bias/normalization constants, shrank the input of {consumers}"
    )
    shrunk = f"input channels removed with the output channels of {producer}"
    return [(found.producer, found.weight, own), *((node, w, shrunk) for node, w, _ in found.consumers)]


def _parameters(graph: ir.Graph) -> int:
    return sum(v.const_value.size for v in graph.initializers.values() if v.const_value is not None)
