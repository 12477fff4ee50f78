"""How the automatic search ranks its measured candidates by the user's goal and budget.

A candidate is *feasible* when it was measured, meets the budget, is fast enough for the goal (measurably faster
for `fastest`; not measurably slower for the others, unless `smallest` with `allow_slower`) and is not beaten by
the default plan on both size and accuracy. The goal's order: size then latency (`balanced`, `smallest`), latency
then size (`fastest`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pydantic import TypeAdapter

from onnx_ops import auto_budget as budget
from onnx_ops.plan import AutoStep, Step
from onnx_ops.report import AutoCandidate, LayerSensitivity

__all__ = ["Ranking", "steps_of"]

_STEPS: TypeAdapter[list[Step]] = TypeAdapter(list[Step])


def steps_of(candidate: AutoCandidate | None) -> list[Step]:
    """The plan steps of a recorded candidate (none for None)."""
    return [] if candidate is None else _STEPS.validate_python(candidate.steps)


@dataclasses.dataclass
class Ranking:
    """The search's candidates, ranked by the goal.

    Attributes:
        step: The auto step (budget, goal).
        candidates: The measured candidates, in order (the search's own list, shared).
        default: The default plan's candidate, the bar every choice must pass (None until measured, or when the
            quantize family is not searched).
    """

    step: AutoStep
    candidates: list[AutoCandidate]
    default: AutoCandidate | None = None

    def speed_ok(self, c: AutoCandidate) -> bool:
        """Fast enough for the goal: measurably faster (fastest), or not measurably slower (the others)."""
        if self.step.goal == "fastest":
            return c.latency_verdict == "faster"
        return c.latency_verdict != "slower" or (self.step.goal == "smallest" and self.step.allow_slower)

    def fair(self, c: AutoCandidate) -> bool:
        """False when the default plan beats `c` on both size and accuracy (then `c` is never returned)."""
        return self.default is None or not budget.dominates(self.default, c)

    def feasible(self) -> list[AutoCandidate]:
        """The measured candidates within budget, fast enough for the goal and not beaten by the default plan."""
        return [
            c
            for c in self.candidates
            if c.status == "measured" and c.meets_budget and self.speed_ok(c) and self.fair(c)
        ]

    def recorded(self) -> list[AutoCandidate]:
        """The candidates, those the default plan beats on size and accuracy marked so."""
        if self.default is None:
            return self.candidates
        mark = {"dominated_by": self.default.index}
        return [c if self.fair(c) else c.model_copy(update=mark) for c in self.candidates]

    def score(self, c: AutoCandidate) -> tuple[float, float]:
        """The goal's sort key (lower is better)."""
        size, latency = c.size_ratio or 1.0, c.latency_ratio or 1.0
        return (latency, size) if self.step.goal == "fastest" else (size, latency)

    def best(self) -> AutoCandidate | None:
        """The best feasible candidate so far, or None."""
        return min(self.feasible(), key=self.score, default=None)

    def closeness(self, c: AutoCandidate) -> float:
        """How close `c` comes to the budget (higher is closer; see auto_budget.closeness)."""
        return budget.closeness(c, self.step)

    def promising(self, eligible: Callable[[AutoCandidate], bool] = lambda c: True) -> list[AutoCandidate]:
        """Up to two `eligible` measured settings, fast enough for the goal, missing the budget but beating the best.

        The closest to the budget come first: search-time latencies of similar settings differ by noise, while
        a setting far outside the budget rarely comes back within it.
        """
        best = self.best()
        misses = [
            c
            for c in self.candidates
            if c.status == "measured" and self.speed_ok(c) and not c.meets_budget and eligible(c)
        ]
        if best is not None:
            misses = [c for c in misses if self.score(c) < self.score(best)]
        return sorted(misses, key=lambda c: (-self.closeness(c), *self.score(c)))[:2]

    def harmless(self, item: LayerSensitivity) -> bool:
        """A one-layer loss small enough that several such layers together may still fit the budget."""
        if self.step.budget == "accuracy":
            return item.accuracy_drop is not None and item.accuracy_drop <= self.step.max_accuracy_drop / 4
        return item.loss <= (1.0 - self.step.min_cosine) / 4
