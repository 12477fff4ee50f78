"""Structured pruning: remove whole output channels layer by layer and shrink their consumers (see _structured)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_ops.passes import _structured, _structured_scores
from onnx_ops.passes._base import Feed, PassLog, constant_array
from onnx_ops.passes._prune_targets import Target, collect, layer_change
from onnx_ops.plan import PruneStep

__all__ = ["run_structured", "trace_target"]


def trace_target(target: Target, step: PruneStep) -> _structured.Trace | str:
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


def run_structured(model: ir.Model, step: PruneStep, log: PassLog, feeds: Sequence[Feed] | None = None) -> bool:
    """Remove output channels layer by layer in graph order; returns True if any layer changed.

    With calibration feeds, the channels removed are those sending the least energy into their consumers.
    """
    graph = model.graph
    traced = [trace_target(t, step) for t in collect(graph, step, PassLog())] if feeds else []
    energy = _structured_scores.channel_energy(model, [t for t in traced if not isinstance(t, str)], feeds or [])
    removed_total = channels_total = layers = 0
    params_before = _parameters(graph)
    history: dict[ir.Value, tuple[ir.Node, np.ndarray, list[str]]] = {}  # weight -> node, original, notes
    skipped: set[ir.Node] = set()
    for target in collect(graph, step, log):
        # Trace right before slicing: an earlier layer may have shrunk this node's input dimension.
        found = trace_target(target, step)
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
        log.layers.append(layer_change(node, weight, original, after, rel, "; ".join(notes)))
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
