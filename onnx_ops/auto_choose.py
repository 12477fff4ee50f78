"""How the automatic search ends: the best candidates timed again, longer, one chosen, and the search's record.

Search timing is short: the top three feasible candidates (by the goal's order; the closest to the budget when
none meets it) are timed again against the original and kept if still fast enough for the goal. `balanced` then
takes the fastest within 2% of the smallest's size; `fastest` a smaller candidate that is not measurably slower
than the fastest head-to-head; `smallest` the smallest. When none is confirmed, the original model is kept.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Literal

from onnx_ops import auto_budget as budget
from onnx_ops import auto_clock
from onnx_ops.auto_layers import LAYER_METHOD
from onnx_ops.evaluate import Runner, compare_latency
from onnx_ops.plan import Plan
from onnx_ops.report import AutoCandidate, AutoResult
from onnx_ops.timing import TimingSettings

if TYPE_CHECKING:
    from onnx_ops.auto import Search

__all__ = ["CONFIRM_TIMING", "SearchOutcome", "choose"]

logger = logging.getLogger(__name__)

# The longer confirmation of the best ones: until the 95% interval is within 5% of the ratio or the seconds are spent.
CONFIRM_TIMING = TimingSettings(warmup=2, min_pairs=20, seconds=3.0, target_width=0.05)
_SAME_SIZE = 0.02  # balanced: candidates within 2% of the smallest's size count as equally small (faster wins)
_GOALS = {
    "balanced": "balanced: the smallest within budget that is not measurably slower",
    "fastest": "fastest: the lowest latency among those measurably faster",
    "smallest": "smallest: the fewest bytes, not measurably slower",
    "smallest, slower allowed": "smallest: the fewest bytes, slower allowed",
}


@dataclasses.dataclass(frozen=True)
class SearchOutcome:
    """The chosen plan (None: keep the original model) and the record of the search."""

    plan: Plan | None
    result: AutoResult


def choose(search: Search) -> SearchOutcome:
    """Confirm the best candidates' speed and choose one (see the module docstring)."""
    ranking = search.ranking
    search.report("confirming the latency of the best candidates", phase=5)
    feasible = sorted(ranking.feasible(), key=ranking.score)
    status: Literal["met", "not_met"] = "met"
    if not feasible:
        status = "not_met"
        closest = [c for c in search.candidates if c.index in search.models and ranking.fair(c)]
        feasible = sorted(closest, key=lambda c: (-ranking.closeness(c), *ranking.score(c)))
    pool = feasible[:3]
    if status == "met" and search.step.goal == "fastest" and feasible[3:]:  # and the smallest tied with the best
        tied = [c for c in feasible[3:] if (c.latency_low or 1) <= (feasible[0].latency_high or 1)]
        pool += [min(tied, key=lambda c: c.size_ratio or 1)] if tied else []
    confirmed: list[AutoCandidate] = []
    for i, candidate in enumerate(pool):
        runner = Runner(search.models[candidate.index], threads=1, what="compressed model")
        again = candidate.model_copy(update=search.timed(runner, _confirm_timing(search, len(pool) - i)))
        search.candidates[candidate.index] = again
        if ranking.speed_ok(again):
            confirmed.append(again)
        else:
            logger.info("candidate %d: %s on confirmation", candidate.index, again.latency_verdict)
    if not confirmed:
        return _outcome(search, "original", None)
    return _outcome(search, status, _pick(search, confirmed) if status == "met" else confirmed[0])


def _confirm_timing(search: Search, pieces: int) -> TimingSettings:
    """CONFIRM_TIMING, its seconds cut so that `pieces` such timings share the time budget's rest."""
    seconds = search.time.seconds_for(pieces, CONFIRM_TIMING.seconds)
    return dataclasses.replace(CONFIRM_TIMING, seconds=seconds)


def _pick(search: Search, confirmed: list[AutoCandidate]) -> AutoCandidate:
    """The best by confirmed figures (balanced: the fastest within _SAME_SIZE of the smallest).

    For `fastest`, a smaller candidate that is not measurably slower than the fastest head-to-head wins.
    """
    best = min(confirmed, key=search.ranking.score)
    if search.step.goal == "balanced":
        alike = [c for c in confirmed if (c.size_ratio or 1) <= (best.size_ratio or 1) * (1 + _SAME_SIZE)]
        return min(alike, key=lambda c: (c.latency_ratio or 1, c.size_ratio or 1))
    if search.step.goal != "fastest":
        return best
    for candidate in sorted(confirmed, key=lambda c: c.size_ratio or 1):
        if (candidate.size_ratio or 1) >= (best.size_ratio or 1) * 0.99:
            break
        # Two compressed models timed against each other: finer than two ratios to the original.
        fast = Runner(search.models[best.index], threads=1, what="compressed model")
        small = Runner(search.models[candidate.index], threads=1, what="compressed model")
        feed = search.inputs.dataset.feeds[0]
        head = compare_latency(fast, small, feed, settings=_confirm_timing(search, 1)).comparison
        logger.info("candidate %d against %d head-to-head: %.3f", candidate.index, best.index, head.ratio)
        if head.verdict != "slower":
            search.tie_note = (
                f"; smaller than candidate {best.index} and not measurably slower head-to-head (time ratio "
                f"{head.ratio:.3f}, 95% interval {head.ratio_low:.3f}-{head.ratio_high:.3f})"
            )
            return candidate
    return best


def _outcome(
    search: Search, status: Literal["met", "not_met", "original"], chosen: AutoCandidate | None
) -> SearchOutcome:
    step = search.step
    slower_ok = step.goal == "smallest" and step.allow_slower
    plan = None if chosen is None else search.plan_from(chosen.steps)
    seconds = search.elapsed()
    phases = search.time.records()
    notes = [*search.notes, *auto_clock.notes(phases, seconds, step.time_budget_s)]
    result = AutoResult(
        budget=step.budget_text,
        threshold=step.max_accuracy_drop if step.budget == "accuracy" else step.min_cosine,
        goal=_GOALS["smallest, slower allowed" if slower_ok else step.goal],
        status=status,
        message=_message(search, status, chosen, seconds),
        chosen=None if chosen is None else chosen.index,
        plan=None if plan is None else plan.model_dump(mode="json"),
        candidates=search.ranking.recorded(),
        sensitivity=search.sensitivity,
        sensitivity_method=(
            "quantize: proxy (int8 rounding of one layer's weight and input activation, run in ONNX Runtime); "
            f"{LAYER_METHOD}. Loss = 1 - worst float output cosine on {search.sensitivity_samples} evaluation "
            "samples."
        ),
        proxy_check=search.proxy_check,
        search_seconds=seconds,
        time_budget_s=step.time_budget_s,
        stopped_early=search.stopped_early or any(p.status != "done" for p in phases),
        phases=phases,
        notes=notes,
    )
    return SearchOutcome(plan=plan, result=result)


def _message(search: Search, status: str, chosen: AutoCandidate | None, seconds: float) -> str:
    step = search.step
    tried = f"{len(search.candidates)} candidate(s) in {seconds:.0f} s of a {step.time_budget_s} s time budget"
    if chosen is None:
        need = "measurably faster than" if step.goal == "fastest" else "not measurably slower than"
        return (
            f"no candidate was both loadable by ONNX Runtime and {need} the original ({tried}); "
            "the original model is returned unchanged"
        )
    what = (
        f"candidate {chosen.index} ({chosen.label}): {chosen.size_ratio or 1:.2f}x the size, time ratio "
        f"{chosen.latency_ratio or 1:.3f} (95% interval {chosen.latency_low or 1:.3f}-"
        f"{chosen.latency_high or 1:.3f}, one thread's CPU time: {chosen.latency_verdict}), "
        f"{budget.describe(chosen)}"
    )
    what += search.tie_note
    if status == "met":
        return f"{what}; meets the budget ({step.budget_text}); {tried}"
    return f"NO candidate met the budget ({step.budget_text}); returning the closest, {what}; {tried}"
