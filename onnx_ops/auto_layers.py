"""The automatic search's layer phases: structured pruning and SVD of the layers whose one-layer change costs least.

For each family, the one-layer sensitivity of the largest layers is measured with the real pass (structured
pruning of a quarter of one layer's output channels; SVD of one layer at rank ratio 0.25), then the harmless
layers (a loss of at most a quarter of the budget each; all of them, then half, a quarter, one) are pruned or
factorized together, put before the best plan found so far, until one such candidate meets the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import onnx

from onnx_ops import auto_sensitivity as sens
from onnx_ops.auto_ranking import steps_of
from onnx_ops.plan import PruneStep, Step, SvdStep

if TYPE_CHECKING:
    from onnx_ops.auto import Search

__all__ = ["LAYER_METHOD", "insert", "layer_phase"]

_PROBE_SHARE = 0.5  # of the phase's time, at most, for its one-layer probes (the rest: its candidates)
_MAX_LAYERS = 16  # one-layer prune/svd sensitivity is measured on this many of the largest layers
_SVD_RANK_RATIO = 0.25  # saves parameters on square matrices (rank * (K + N) < K * N needs < 0.5)
_PRUNE_SPARSITY = 0.25  # structured: a quarter of the output channels of each chosen layer
_LABELS = {"prune": f"structured prune {_PRUNE_SPARSITY:.0%}", "svd": f"svd rank x{_SVD_RANK_RATIO}"}
LAYER_METHOD = (
    f"prune: the real structured pass on one layer ({_PRUNE_SPARSITY:.0%} of its channels); svd: the real pass on "
    f"one layer at rank ratio {_SVD_RANK_RATIO}"
)
# Where each kind goes in a plan: lossless simplification first, then prune, svd, and the rest (distill, the
# final step) in the order the plan had them.
_ORDER = {"optimize": -1, "prune": 0, "svd": 1}


def layer_phase(search: Search, family: Literal["prune", "svd"], layers: list[sens.Layer]) -> None:
    """One-layer sensitivity of the largest layers, then the least sensitive ones together before the best."""
    if not layers or search.out_of_time():
        return
    names = [layer.name for layer in layers]
    largest = sorted(layers, key=lambda x: x.parameters, reverse=True)[:_MAX_LAYERS]
    search.report(f"{family} sensitivity of {len(largest)} layers", phase=3 if family == "prune" else 4)

    def one(layer: sens.Layer) -> onnx.ModelProto:
        return search.inputs.build(search.plan([_layer_step(family, names, [layer.name])]))

    found = sens.measure(largest, family, one, search.scorer(), search.time.work(f"probe {family}", _PROBE_SHARE))
    search.sensitivity += found
    best = search.ranking.best()
    base = steps_of(best)
    # Layers the best plan leaves in float stay untouched: they were left alone for being sensitive.
    kept = {n for step in base for n in getattr(step, "exclude_nodes", ())}
    harmless = sorted((s for s in found if search.ranking.harmless(s) and s.name not in kept), key=lambda s: s.loss)
    for k in sorted({len(harmless), len(harmless) // 2, len(harmless) // 4, 1} - {0}, reverse=True):
        if search.out_of_time():
            return
        step = _layer_step(family, names, [s.name for s in harmless[:k]])
        label = f"{_LABELS[family]} on {k} layer(s)" + (f" + {best.label}" if best is not None else "")
        if search.attempt(label, insert(step, base)).meets_budget:
            break


def insert(step: Step, steps: Sequence[Step]) -> list[Step]:
    """`steps` with `step` put where the order optimize, prune, svd, final step wants it."""
    rank = _ORDER.get(step.kind, 2)
    at = next((i for i, s in enumerate(steps) if _ORDER.get(s.kind, 2) > rank), len(steps))
    return [*steps[:at], step, *steps[at:]]


def _layer_step(family: Literal["prune", "svd"], all_layers: Sequence[str], chosen: Sequence[str]) -> Step:
    if family == "prune":
        return PruneStep(method="structured", sparsity=_PRUNE_SPARSITY, only_nodes=sorted(chosen))
    keep = set(chosen)
    return SvdStep(rank_ratio=_SVD_RANK_RATIO, exclude_nodes=[n for n in all_layers if n not in keep])
