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

import logging

import numpy as np
import onnx_ir as ir

from onnx_ops.errors import PlanError
from onnx_ops.passes import _masks, _prune_allocation, _structured
from onnx_ops.passes._base import (
    PassContext,
    PassLog,
    constant_array,
    release_proto,
    set_constant,
    sum_squares,
)
from onnx_ops.passes._prune_structured import run_structured, trace_target
from onnx_ops.passes._prune_targets import collect, layer_change, nm_reason, none_found
from onnx_ops.plan import PruneStep

__all__ = ["MagnitudePrunePass"]

logger = logging.getLogger(__name__)

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
        targets = collect(model.graph, step, scratch)
        if step.method == "structured":
            traces = [trace_target(t, step) for t in targets]
            if not any(isinstance(t, _structured.Trace) for t in traces):
                reasons = "; ".join(
                    dict.fromkeys(f"{t.name}: {r}" for t, r in zip(targets, traces, strict=True) if isinstance(r, str))
                )
                raise PlanError(f"structured pruning finds no layer it can shrink ({reasons or none_found(step)})")
            return
        if step.method == "n:m" and targets and all(nm_reason(t, step.m) for t in targets):
            raise PlanError(f"n:m pruning finds no weight whose input dimension is divisible by m={step.m}")
        if not targets:
            skipped = "; ".join(dict.fromkeys(s.reason for s in scratch.skipped))[:300]
            raise PlanError(f"{step.method} pruning finds {none_found(step)}" + (skipped and f" (skipped: {skipped})"))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Prune in place; ``modified`` is False when no weight changed."""
        if self.step.method == "structured":
            modified = run_structured(model, self.step, self.log, self.context.calibration)
        else:
            modified = _run_dense(model, self.step, self.log, self.context)
            method = "Unstructured" if self.step.method == "unstructured" else "N:M"
            self.log.warnings.append(_DENSE_WARNING.format(method=method))
        logger.info("prune (%s): %s", self.step.method, self.log.summary)
        return ir.passes.PassResult(model, modified=modified)


def _run_dense(model: ir.Model, step: PruneStep, log: PassLog, context: PassContext) -> bool:
    """Unstructured or N:M pruning of every target; returns True if any weight changed."""
    targets = collect(model.graph, step, log)
    if step.method == "n:m":
        reasons = [nm_reason(t, step.m) for t in targets]
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
        log.layers.append(layer_change(target.nodes[0], target.weight, before, after, rel_error, note))
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
