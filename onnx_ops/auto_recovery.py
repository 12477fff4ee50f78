"""The automatic search's recovery candidates: pruning and low-rank refit to the original on the calibration data.

Tried after the one-layer pruning and SVD phases and before the other formats (see ``auto``), only when the user
gave calibration data (the original model is the teacher, the calibration inputs the training set), each measured
like every other candidate (budget per sample and output, CPU-time ratio with its 95% interval). Few and chosen to
go below int8 alone:

* structured pruning of a quarter of the output channels of the layers the prune phase measured (its one-layer
  sensitivity; all eligible layers when none was measured), then ``distill`` (the consumer layers refit so the
  kept channels re-express the removed ones), then the best plan's final step (int8 by default): fewer
  parameters, then int8; when it misses, the same on the less sensitive half;
* activation-aware SVD keeping half the parameters of the MatMul/Gemm weights (models where such weights hold
  a quarter of the float weights or more), then the best plan's final step;
* except for goal fastest (k-means runs as fast as float, not faster): the recovered structured pruning and SVD
  that met the budget, with k-means at 4 bits instead of the final step; then unstructured pruning of half the
  weights chosen with the activations' help (|W| times input norm), ``distill``, then k-means at 4 bits with
  zero kept as a centroid; 3 bits next when 4 meets the budget (smallest).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import onnx_ir as ir
from pydantic import TypeAdapter

from onnx_ops.plan import (
    FINAL_KINDS,
    AutoStep,
    ClusterStep,
    DistillStep,
    PruneStep,
    QuantizeStep,
    Step,
    SvdStep,
)
from onnx_ops.report import AutoCandidate, LayerSensitivity

__all__ = ["SKIPPED_NOTE", "RecoverySearch"]

SKIPPED_NOTE = (
    "recovery candidates (pruning and activation-aware SVD refit to the original by distill) skipped: they need "
    "calibration data"
)
_STRUCTURED = 0.25  # of each chosen layer's output channels
_UNSTRUCTURED = 0.5  # of each layer's weights
_SVD_PARAMS = 0.5  # of the eligible MatMul/Gemm parameters
_SVD_SHARE = 0.25  # least share of the float weights in eligible MatMul/Gemm weights for the SVD candidate
_SVD_MIN = 4096  # SvdStep's default min_elements
_PRUNE_OPS = frozenset({"Conv", "MatMul", "Gemm"})
_STEPS: TypeAdapter[list[Step]] = TypeAdapter(list[Step])


@dataclasses.dataclass
class RecoverySearch:
    """The recovery candidates of one search.

    Attributes:
        step: The auto step (goal, families).
        model: The original model as the passes see it (weights as initializers).
        calibration: Whether the user gave calibration data.
        sensitivity: The one-layer sensitivities measured so far (the prune phase's rank the layers).
        attempt: Measures one candidate (label, steps) and returns it (the search's own ``_try``).
        best: The best candidate within budget so far, by the goal's order, or None.
        out_of_time: True once the search's time budget is spent.
        notes: Where the search says what it skipped (appended to).
    """

    step: AutoStep
    model: ir.Model
    calibration: bool
    sensitivity: Sequence[LayerSensitivity]
    attempt: Callable[[str, list[Step]], AutoCandidate]
    best: Callable[[], AutoCandidate | None]
    out_of_time: Callable[[], bool]
    notes: list[str]

    def run(self) -> None:
        """Try the candidates of the module docstring that the step's families allow (none without calibration)."""
        families = set(self.step.families)
        if not families & {"prune", "svd"}:
            return
        if not self.calibration:
            self.notes.append(SKIPPED_NOTE)
            return
        final, label = self._final()
        within: list[tuple[str, list[Step]]] = []  # recovered steps that met the budget before the final step
        if "prune" in families:
            within += self._structured(final, label)
        if "svd" in families and self._share() >= _SVD_SHARE and not self.out_of_time():
            svd = SvdStep(activation_aware=True, param_ratio=_SVD_PARAMS)
            what = f"activation-aware svd {_SVD_PARAMS:.0%} of parameters"
            within += [(what, [svd])] if self.attempt(f"{what} + {label}", [svd, final]).meets_budget else []
        if "cluster" not in families or self.step.goal == "fastest":
            return
        for what, steps in within:
            if self.out_of_time():
                return
            self.attempt(f"{what} + k-means 4 bits", [*steps, ClusterStep(bits=4)])
        if "prune" in families:
            self._unstructured()

    def _final(self) -> tuple[Step, str]:
        """The best plan's final step (int8 settings, layers left in float), else dynamic int8; and its label."""
        best = self.best()
        steps = [] if best is None else _STEPS.validate_python(best.steps)
        default = QuantizeStep(mode="dynamic", speed_check=False)
        final = steps[-1] if steps and steps[-1].kind in FINAL_KINDS else default
        if not isinstance(final, QuantizeStep):
            return final, final.kind
        kept = " (some layers in float)" if final.exclude_nodes else ""
        return final, f"int8 {final.mode}{' ' + final.format if final.mode == 'static' else ''}{kept}"

    def _structured(self, final: Step, label: str) -> list[tuple[str, list[Step]]]:
        """All ranked layers, then the less sensitive half; the steps before `final` when one meets the budget."""
        layers = self._ranked()
        for share in (1.0, 0.5) if layers else ():
            chosen = layers[: max(1, round(len(layers) * share))]
            if self.out_of_time():
                break
            prune = PruneStep(method="structured", sparsity=_STRUCTURED, only_nodes=sorted(chosen))
            what = f"structured prune {_STRUCTURED:.0%} on {len(chosen)} layer(s) + distill"
            if self.attempt(f"{what} + {label}", [prune, DistillStep(), final]).meets_budget:
                return [(what, [prune, DistillStep()])]
        return []

    def _unstructured(self) -> None:
        prune = PruneStep(sparsity=_UNSTRUCTURED, criterion="activation")
        for bits in (4, 3):
            if self.out_of_time():
                return
            label = f"prune {_UNSTRUCTURED:.0%} (activation-aware) + distill + k-means {bits} bits"
            found = self.attempt(label, [prune, DistillStep(), ClusterStep(bits=bits)])
            if not found.meets_budget or self.step.goal != "smallest":
                return

    def _ranked(self) -> list[str]:
        """Prunable layers, least sensitive first (by the prune phase's one-layer loss; unmeasured ones last)."""
        measured = {s.name: s.loss for s in self.sensitivity if s.family == "prune"}
        if measured:
            return sorted(measured, key=lambda name: measured[name])
        return [
            node.name
            for node in self.model.graph
            if node.op_type in _PRUNE_OPS and node.name and _weight_size(node, matrix=False)
        ]

    def _share(self) -> float:
        """The share of the float weight values held by MatMul/Gemm weights the SVD step would factorize."""
        total = sum(
            v.const_value.size
            for v in self.model.graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
        )
        eligible = sum(_weight_size(node) for node in self.model.graph if node.op_type in {"MatMul", "Gemm"})
        return eligible / total if total else 0.0


def _weight_size(node: ir.Node, matrix: bool = True) -> int:
    """Values of the node's constant float weight (its second input; a matrix when `matrix`) of at least 4096."""
    if len(node.inputs) < 2:
        return 0
    value = node.inputs[1]
    if value is None or value.const_value is None or value.const_value.dtype != ir.DataType.FLOAT:
        return 0
    size = value.const_value.size
    return size if size >= _SVD_MIN and (len(value.const_value.shape) == 2 or not matrix) else 0
