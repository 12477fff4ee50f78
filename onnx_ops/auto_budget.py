"""Judging `auto` candidates where damage hides: per sample, per output, by the task; and the default plan's bar.

A cosine pooled over all samples can stay above 0.99 while a few samples' outputs turn: on a file-type classifier
a candidate kept a pooled cosine within budget while some samples fell to 0.80 and top-1 agreement with the
original fell to 0.915. So a candidate meets the cosine budget (``min_cosine``) only when, for every output:

- float outputs: the 5th percentile of the per-sample cosine (one cosine per batch row of each run) is at least
  ``min_cosine``; outputs of a single number per run are judged by their pooled cosine;
- class-score outputs (probabilities, or the output the labels score): the share of samples whose argmax is
  unchanged (top-1 agreement) is at least ``min_cosine``;
- integer and boolean outputs (class ids, token ids): the share of exactly equal elements is at least
  ``min_cosine``;
- with labels: the task accuracy drops by at most ``max_accuracy_drop`` points.

The accuracy budget judges the task accuracy drop, as before.

The default plan (dynamic quantization with the pass's own choices) is always measured, and a candidate it beats on
size and accuracy is never returned: one that is larger and no more accurate than what a user gets without `auto`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from onnx_ops.agreement import LOW_PERCENTILE, accuracy, is_distribution, measure_agreement
from onnx_ops.plan import AutoStep, QuantizeStep
from onnx_ops.report import AutoCandidate

__all__ = ["DEFAULT_LABEL", "Judgement", "closeness", "default_step", "describe", "dominates", "judge", "judged_cosine"]

DEFAULT_LABEL = "default plan (dynamic quantize, the pass's own op types and int8 storage)"
_EPS = 1e-9  # drops are sums of 1/n and cosines are float sums: ties within this are ties


@dataclasses.dataclass(frozen=True)
class Judgement:
    """A candidate's accuracy figures against the original, and whether they meet the budget.

    Attributes:
        cosine: Worst pooled cosine over the float outputs (1.0 when there are none).
        cosine_p5: Worst 5th-percentile per-sample cosine over the float outputs (None: none measured).
        agreement: Worst top-1 agreement (class scores) or exact agreement (integer outputs); None when neither.
        accuracy_drop: Task accuracy drop in points (with labels).
        misses: What missed the budget, in words (empty when it is met).
    """

    cosine: float
    cosine_p5: float | None
    agreement: float | None
    accuracy_drop: float | None
    misses: list[str]

    @property
    def meets(self) -> bool:
        """True when nothing missed the budget."""
        return not self.misses

    def fields(self) -> dict[str, object]:
        """The AutoCandidate fields this judgement fills."""
        return {
            "cosine": self.cosine, "cosine_p5": self.cosine_p5, "agreement": self.agreement,
            "accuracy_drop": self.accuracy_drop, "meets_budget": self.meets, "budget_misses": self.misses,
        }  # fmt: skip


def judge(
    step: AutoStep,
    names: Sequence[str],
    ref: Sequence[Sequence[object]],
    new: Sequence[Sequence[object]],
    labels: np.ndarray | None,
) -> Judgement:
    """Measure a candidate's outputs `new` against the original's `ref` and judge them by the step's budget."""
    meter = measure_agreement(names, ref, new)
    floats, exact = meter.floating(), meter.exact()
    acc = accuracy(names, labels, ref, new) if labels is not None else None  # type: ignore[arg-type]
    drop = None if acc is None else acc.drop_points
    # Top-1 is judged on outputs that surely are class scores: probabilities, or the output the labels score.
    # A [batch, n] float output may as well be an embedding, whose argmax means nothing.
    first = ref[0] if ref else []
    classes = {n for n, value in zip(names, first, strict=False) if is_distribution(value)}
    classes |= {acc.output} if acc is not None else set()
    misses: list[str] = []
    if step.budget == "accuracy":
        if drop is None or drop > step.max_accuracy_drop + _EPS:
            misses.append(f"task accuracy drop {drop if drop is not None else float('nan'):.2f} points")
    else:
        bar = step.min_cosine
        for out in floats:
            sample = out.cosine_p5 if out.cosine_p5 is not None else out.cosine
            what = f"{LOW_PERCENTILE}th percentile sample cosine" if out.cosine_p5 is not None else "cosine"
            if sample < bar:
                misses.append(f"{out.name}: {what} {sample:.5f}")
            if out.name in classes and out.top1_agreement is not None and out.top1_agreement < bar:
                misses.append(f"{out.name}: top-1 agreement {out.top1_agreement:.4f}")
        misses += [f"{x.name}: exact agreement {x.exact_agreement:.4f}" for x in exact if x.exact_agreement < bar]
        if drop is not None and drop > step.max_accuracy_drop + _EPS:
            misses.append(f"task accuracy drop {drop:.2f} points")
    p5 = [o.cosine_p5 for o in floats if o.cosine_p5 is not None]
    agree = [o.top1_agreement for o in floats if o.name in classes and o.top1_agreement is not None]
    agree += [x.exact_agreement for x in exact]
    return Judgement(
        cosine=min((o.cosine for o in floats), default=1.0),
        cosine_p5=min(p5, default=None),
        agreement=min(agree, default=None),
        accuracy_drop=drop,
        misses=misses,
    )


def closeness(candidate: AutoCandidate, step: AutoStep) -> float:
    """How accurate a candidate is, in the budget's terms (higher is better): what the budget is compared with."""
    if step.budget == "accuracy":
        return -(candidate.accuracy_drop if candidate.accuracy_drop is not None else 100.0)
    return judged_cosine(candidate)


def judged_cosine(candidate: AutoCandidate) -> float:
    """The lowest of the figures the cosine budget judges: 5th-percentile sample cosine and top-1/exact agreement."""
    figures = [candidate.cosine_p5 if candidate.cosine_p5 is not None else candidate.cosine, candidate.agreement]
    return min((f for f in figures if f is not None), default=0.0)


def describe(candidate: AutoCandidate) -> str:
    """The candidate's accuracy figures in words, for messages."""
    c = candidate
    text = f"cosine {c.cosine or 0:.5f}"
    text += f", {LOW_PERCENTILE}th percentile sample cosine {c.cosine_p5:.5f}" if c.cosine_p5 is not None else ""
    text += f", top-1/exact agreement {c.agreement:.4f}" if c.agreement is not None else ""
    return text + (f", accuracy drop {c.accuracy_drop:.2f} points" if c.accuracy_drop is not None else "")


def _as_accurate(a: AutoCandidate, b: AutoCandidate) -> bool:
    """True when `a` is at least as accurate as `b` on every figure both have."""
    pairs = [(a.cosine, b.cosine), (a.cosine_p5, b.cosine_p5), (a.agreement, b.agreement)]
    higher = all(x is None or y is None or x >= y - _EPS for x, y in pairs)
    lower_drop = a.accuracy_drop is None or b.accuracy_drop is None or a.accuracy_drop <= b.accuracy_drop + _EPS
    return higher and lower_drop


def dominates(default: AutoCandidate, other: AutoCandidate) -> bool:
    """True when the default plan's candidate is smaller than `other` and at least as accurate on every figure."""
    if default.index == other.index or default.status != "measured" or other.status != "measured":
        return False
    smaller = (default.size_bytes or 0) < (other.size_bytes or 0)
    return smaller and _as_accurate(default, other)


def default_step() -> QuantizeStep:
    """The plan a user gets without `auto`: QuantizeStep's defaults (its speed check is auto's own timing)."""
    return QuantizeStep(speed_check=False)
