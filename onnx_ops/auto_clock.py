"""The automatic search's time: each phase's share of the time left, and whether the next piece of work fits in it.

The search runs on a clock (``time.perf_counter`` unless a test gives another). A reserve for confirming the best
candidates' speed at the end is kept aside (a tenth of the budget, at most 12 s); the rest is shared between the
phases that will run, by weight, out of the time *left* when each phase begins::

    phase end = now + left * weight / (the weights of this phase and of every phase after it)

so a phase that ends early leaves its time to the ones after it, and one that overran takes time from them but
never all of it: the last phases are not starved. When the phases are done and time is left (a phase used less
than its share), the phases that were cut short and propose only candidates (each measured once, so proposing
them again costs nothing for those measured) run again in a second round, sharing what is left by weight.

Within a phase, a candidate or probe starts only when the time it is estimated to take fits before the phase's end:
the longest time the same kind of work (candidates: the same step kinds, quantize by mode; probes: the same
family) took earlier in this search; the first of its kind is estimated by the longest of its category (candidate
or probe) so far. The budget is therefore exceeded only by what a piece of work takes beyond its estimate (most
often the first of a kind, and at most what that one piece takes). Each phase's record (``AutoPhase``) says what
it was given, what it spent, and whether it was cut short or skipped for lack of time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from onnx_ops.plan import Step
from onnx_ops.report import AutoPhase

__all__ = ["CONFIRM_RESERVE_S", "Clock", "SearchTime", "Work", "candidate_kind", "notes"]

Clock = Callable[[], float]
CONFIRM_RESERVE_S = 12.0  # at most, kept for the confirmation of the best candidates' speed (auto_choose)
_CONFIRM_SHARE = 0.1  # of the time budget, at most, for that reserve


@dataclasses.dataclass
class _Phase:
    name: str
    weight: float
    started: float = 0.0
    end: float = 0.0
    done: int = 0  # pieces of work done
    refused: set[str] = dataclasses.field(default_factory=set)  # candidates not started for lack of time (by key)
    probes_refused: int = 0  # probes not started for lack of time
    cut: bool = False  # the phase's time ran out while it still had work
    seconds: float = 0.0
    begun: bool = False


class SearchTime:
    """The search's clock, budget, phases and the measured cost of each kind of work (see the module docstring)."""

    def __init__(self, budget_s: float, clock: Clock = time.perf_counter) -> None:
        self.clock = clock
        self.budget_s = budget_s
        self.started = clock()
        self.deadline = self.started + budget_s
        self.reserve = min(CONFIRM_RESERVE_S, _CONFIRM_SHARE * budget_s)
        self.costs: dict[str, float] = {}  # kind -> longest seconds
        self._phases: list[_Phase] = []
        self._current: _Phase | None = None

    def now(self) -> float:
        """The clock's reading."""
        return self.clock()

    def elapsed(self) -> float:
        """Seconds since the search began."""
        return self.clock() - self.started

    def left(self) -> float:
        """Seconds left of the whole budget (negative once overrun)."""
        return self.deadline - self.clock()

    # --- phases -----------------------------------------------------------------------------------------

    def plan(self, phases: Sequence[tuple[str, float]]) -> None:
        """The phases that will run, in order, with their weights (again: a second round after the first)."""
        self._phases += [_Phase(name, weight) for name, weight in phases]

    def unfinished(self) -> list[str]:
        """The phases cut short or skipped so far, in order (each once)."""
        return list(dict.fromkeys(p.name for p in self._phases if p.cut or p.refused or p.probes_refused))

    def begin(self, name: str) -> None:
        """Begin phase `name` (ending the current one): its end is its weight's share of the time left."""
        self.finish()
        phase = next((p for p in self._phases if p.name == name and not p.begun), None)
        if phase is None:  # not planned: runs on what the current plan leaves (no share of its own)
            phase = _Phase(name, 0.0)
            self._phases.append(phase)
        now = self.clock()
        later = self._phases[self._phases.index(phase) :]
        weights = sum(p.weight for p in later if not p.begun)
        left = max(0.0, self.deadline - self.reserve - now)
        share = left * phase.weight / weights if weights > 0 else 0.0
        phase.begun, phase.started, phase.end = True, now, now + share
        self._current = phase

    def finish(self) -> None:
        """End the current phase (if any), recording its seconds."""
        if self._current is not None:
            self._current.seconds = self.clock() - self._current.started
            self._current = None

    def phase_end(self) -> float:
        """When the current phase must end (the search's end outside any phase)."""
        return self.deadline if self._current is None else min(self._current.end, self.deadline)

    def out_of_time(self) -> bool:
        """True once the current phase's time (or the whole budget) is spent; the phase is then marked cut."""
        if self.clock() < self.phase_end():
            return False
        if self._current is not None:
            self._current.cut = True
        return True

    def records(self) -> list[AutoPhase]:
        """What each phase was given, spent and did, its rounds added up.

        A candidate refused in the first round and measured in the second does not count as not started.
        """
        self.finish()
        out = []
        for name in dict.fromkeys(p.name for p in self._phases):
            rounds = [p for p in self._phases if p.name == name]
            refused = len(set().union(*(p.refused for p in rounds))) + sum(p.probes_refused for p in rounds)
            last = rounds[-1]
            done = sum(p.done for p in rounds)
            cut = last.cut or refused > 0 or not last.begun
            status = "done" if not cut else ("skipped" if done == 0 else "cut")
            given = sum(max(0.0, p.end - p.started) for p in rounds)
            seconds = sum(p.seconds for p in rounds)
            out.append(
                AutoPhase(name=name, given_s=given, seconds=seconds, work=done, not_started=refused, status=status)
            )
        return out

    # --- work ---------------------------------------------------------------------------------------------

    def work(self, kind: str, share: float = 1.0, key: str | None = None, like: str = "") -> Work:
        """A piece of work of `kind` in the current phase.

        `share`: of the phase's time left, at most. `key`: the candidate's (one refused now may run in the second
        round). `like`: a kind of work that costs as much, for the first piece of `kind`.
        """
        end = self.phase_end()
        if share < 1.0:
            now = self.clock()
            end = now + max(0.0, end - now) * share
        return Work(self, kind, end, key, like)

    def estimate(self, kind: str, like: str = "") -> float:
        """The longest time `kind` took so far; else `like`'s; else the longest of its category (candidate, probe)."""
        for known in (kind, like):
            if known in self.costs:
                return self.costs[known]
        category = kind.split(" ", 1)[0]
        return max((s for k, s in self.costs.items() if k.split(" ", 1)[0] == category), default=0.0)

    def record(self, kind: str, seconds: float, key: str | None = None) -> None:
        """`kind` took `seconds` (one piece, done in the current phase; `key`: the candidate's, if one)."""
        self.costs[kind] = max(seconds, self.costs.get(kind, 0.0))
        if self._current is not None:
            self._current.done += 1
        for phase in self._phases:
            phase.refused.discard(key or "")

    def refuse(self, count: int = 1, key: str | None = None) -> None:
        """`count` probes (or the candidate `key`) of the current phase were not started for lack of time."""
        if self._current is None:
            return
        if key is None:
            self._current.probes_refused += count
        else:
            self._current.refused.add(key)

    def seconds_for(self, pieces: int, most: float) -> float:
        """Seconds for each of `pieces` of work to share the budget's time left, at most `most` (0 once spent)."""
        return max(0.0, min(most, self.left() / max(1, pieces)))


class Work:
    """One kind of work within a phase: `fits` says whether one more piece may start; ``with work:`` times one."""

    def __init__(self, time_: SearchTime, kind: str, end: float, key: str | None = None, like: str = "") -> None:
        self.time, self.kind, self.end, self.key, self.like = time_, kind, end, key, like
        self._started = 0.0
        self.seconds = 0.0

    def fits(self) -> bool:
        """Whether a piece estimated from this search's earlier work ends before the phase must (else counted)."""
        now = self.time.clock()
        if now < self.end and now + self.time.estimate(self.kind, self.like) <= self.end:
            return True
        self.time.refuse(key=self.key)
        return False

    def skipped(self, count: int) -> None:
        """`count` more pieces were not started (after one `fits` refused)."""
        self.time.refuse(count)

    def __enter__(self) -> Work:
        self._started = self.time.clock()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.seconds = self.time.clock() - self._started
        self.time.record(self.kind, self.seconds, self.key)


def notes(phases: Sequence[AutoPhase], seconds: float, budget_s: float) -> list[str]:
    """What the report says about time: the phases cut short or skipped, and any overrun of the budget."""
    out = []
    for p in phases:
        if p.status == "done":
            continue
        what = "skipped" if p.status == "skipped" else "cut short"
        out.append(
            f"{p.name}: {what} for lack of time ({p.not_started} candidate(s) or probe(s) not started; given "
            f"{p.given_s:.0f} s of the time left, took {p.seconds:.0f} s)"
        )
    if seconds > budget_s:
        out.append(
            f"the search took {seconds:.0f} s, {seconds - budget_s:.0f} s over its {budget_s:.0f} s time budget: "
            "work started within the budget ran longer than the same kind of work had before"
        )
    return out


def candidate_kind(steps: Sequence[Step]) -> str:
    """The kind of work a candidate is, for estimating its time: its step kinds, with their mode or method."""
    parts = []
    for step in steps:
        part: list[str] = [step.kind]
        part += [v for v in (getattr(step, "mode", None), getattr(step, "method", None)) if isinstance(v, str)]
        part += ["aware"] if getattr(step, "activation_aware", False) else []
        parts.append(":".join(part))
    return "candidate " + "+".join(parts)
