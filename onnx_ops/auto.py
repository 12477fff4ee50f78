"""Accuracy-aware automatic compression: find the plan that meets the user's budget, measuring every candidate.

The search, all within the step's time budget and every figure measured with ONNX Runtime on this host:

0. the default plan (QuantizeStep's defaults): a candidate it beats on both size and accuracy is never chosen;
1. quantization settings through ``QuantizePass`` (dynamic per-channel and per-tensor; with calibration data,
   static QDQ and QOperator, per-channel and per-tensor, uint8 activations and int8 weights);
2. per-layer quantization sensitivity (see ``auto_sensitivity``), then, for the most promising settings that
   miss the budget: for static settings percentile calibration and weight layers only (other op types left
   in float), then the same settings with the 1, 2, 4, ... most sensitive layers left in float (phases 0-2
   and the int8 storage of float layers at the end: see ``auto_quantize``);
3. structured pruning (a quarter of the output channels) and then SVD of the layers whose one-layer
   pruning or factorization costs least, put before the best plan found so far (see ``auto_layers``);
4. with calibration data, recovery (see ``auto_recovery``): structured pruning and activation-aware SVD refit to
   the original, then the best final step; unstructured activation-aware pruning, distill and k-means;
5. the other formats where they fit the goal (see ``auto_formats``): graph simplification, k-means clusters,
   int4 and fp16.

The time budget is shared between the phases that run, each getting its weight's share of the time left when it
begins, and a candidate or probe starts only when the time the same kind of work took earlier in the search fits
in its phase (see ``auto_clock``); the report lists the phases cut short or skipped for lack of time.

Each candidate is built by the normal pipeline, loaded by ONNX Runtime, run on the evaluation samples (judged per
sample and per output, see ``auto_budget``) and timed
against the original in interleaved pairs on one ONNX Runtime thread, comparing the calling thread's CPU time
(see ``onnx_ops.timing``): a ratio with its 95% interval, so ties within noise are ties. The goals: `balanced`
takes the smallest candidate within budget that is not measurably slower; `fastest` needs a measured speed-up;
`smallest` ignores speed but takes no measurably slower model unless `allow_slower` (see ``auto_ranking``). The
chosen candidate's speed is confirmed with a longer timing; when no candidate passes, the original model is kept,
with a message (see ``auto_choose``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence

import onnx

from onnx_ops import auto_budget as budget
from onnx_ops import auto_clock
from onnx_ops import auto_formats as formats
from onnx_ops import auto_recovery as recovery
from onnx_ops import auto_sensitivity as sens
from onnx_ops.auto_choose import SearchOutcome, choose
from onnx_ops.auto_layers import layer_phase
from onnx_ops.auto_quantize import QuantizeSearch
from onnx_ops.auto_ranking import Ranking
from onnx_ops.data import Dataset
from onnx_ops.errors import CompressionError
from onnx_ops.evaluate import Runner, compare_latency
from onnx_ops.passes._base import PassContext
from onnx_ops.plan import AutoStep, Plan, Step
from onnx_ops.report import AutoCandidate, LatencyComparison, LayerSensitivity
from onnx_ops.timing import TimingSettings

__all__ = ["Search", "SearchInputs", "SearchOutcome", "search"]

logger = logging.getLogger(__name__)

_SENSITIVITY_SAMPLES = 16
# Timing of one candidate against the original: interleaved pairs, one thread's CPU time, until the 95% interval
# is within 10% of the ratio or the seconds are spent (the best ones are confirmed longer, see auto_choose).
_SEARCH_TIMING = TimingSettings(warmup=2, min_pairs=10, seconds=1.0, target_width=0.1)
_PHASES = 6  # for progress: the search's phases, see the module docstring
# Each phase's weight in sharing the time left (see auto_clock): the settings, which every later phase builds on,
# and recovery, whose candidates cost the most, weigh most.
_WEIGHTS = {
    "int8 settings": 3.0, "int8 sensitivity": 1.0, "int8 exclusions": 1.5, "prune layers": 1.0, "svd layers": 1.0,
    "recovery": 2.0, "formats": 1.5, "int8 storage": 0.5,
}  # fmt: skip
# The phases that propose only candidates (no probes), which a second round may run again.
_AGAIN = ("int8 settings", "int8 exclusions", "recovery", "formats", "int8 storage")


@dataclasses.dataclass(frozen=True)
class SearchInputs:
    """What the search needs from the pipeline.

    Attributes:
        original: The validated original model.
        plan: The user's plan (one auto step, plus input shapes and evaluation options).
        context: The pass context (work directory, calibration feeds, input shapes).
        dataset: Evaluation samples, with labels when the user gave them.
        reference: An ONNX Runtime session over the original model.
        build: Runs a plan on the original model and returns the compressed model (the pipeline's passes).
        progress: Called with (stage, fraction of the search done).
        clock: The clock the time budget runs on, in seconds (None: ``time.perf_counter``).
    """

    original: onnx.ModelProto
    plan: Plan
    context: PassContext
    dataset: Dataset
    reference: Runner
    build: Callable[[Plan], onnx.ModelProto]
    progress: Callable[[str, float], None]
    clock: auto_clock.Clock | None = None


def search(inputs: SearchInputs) -> SearchOutcome:
    """Search for the best plan within the auto step's budget; see the module docstring."""
    return Search(inputs).run()


class Search:
    """One search: its state, the phases in order, and the measurement of each candidate.

    The phases (``auto_quantize``, ``auto_layers``, ``auto_recovery``, ``auto_formats``) propose candidates
    through `attempt`; ``auto_ranking`` ranks them by the goal and ``auto_choose`` ends the search.
    """

    def __init__(self, inputs: SearchInputs) -> None:
        step = inputs.plan.steps[0]
        assert isinstance(step, AutoStep)
        self.inputs, self.step = inputs, step
        self.time = auto_clock.SearchTime(step.time_budget_s, inputs.clock or time.perf_counter)
        self.threads = inputs.plan.evaluation.threads
        self.candidates: list[AutoCandidate] = []
        self.ranking = Ranking(step, self.candidates)
        self.models: dict[int, bytes] = {}  # candidates worth confirming: measured and fast enough for the goal
        self._timing_reference: Runner | None = None  # the original on one thread, for timing
        self.sensitivity: list[LayerSensitivity] = []
        self.sensitivity_samples = min(_SENSITIVITY_SAMPLES, len(inputs.dataset.feeds))
        self.proxy_check: list[dict[str, float | str]] = []
        self.stopped_early = False
        self.activation_matmuls: list[str] = []
        self.tie_note = ""
        self.notes: list[str] = []  # what the search skipped, and why
        self.names = inputs.reference.output_names
        self.ref_out = [inputs.reference.run(feed) for feed in inputs.dataset.feeds]
        self.original_size = inputs.original.ByteSize()
        self.phase = 0.0  # share of the search's phases begun, for progress

    def run(self) -> SearchOutcome:
        """Every phase the step's families allow, in the module docstring's order, then the choice.

        Each phase begins with its share of the time left (see ``auto_clock``).
        """
        model = sens.prepared(self.inputs.original)
        self.activation_matmuls = sens.activation_matmuls(model)
        families = set(self.step.families)
        calibration = bool(self.inputs.context.calibration)
        quantize, layers = "quantize" in families, sens.quantizable_layers(model)
        planned = {
            "int8 settings": quantize,
            "int8 sensitivity": quantize and bool(layers),
            "int8 exclusions": quantize,
            "prune layers": "prune" in families and bool(layers),
            "svd layers": "svd" in families and bool(sens.svd_layers(model)),
            "recovery": bool(families & {"prune", "svd"}) and calibration,
            "formats": bool(families & set(formats.FAMILIES)),
            "int8 storage": quantize,
        }
        self.time.plan([(name, _WEIGHTS[name]) for name, runs in planned.items() if runs])
        int8 = QuantizeSearch(self, model)
        best, attempt, out_of_time = self.ranking.best, self.attempt, self.out_of_time
        phases: dict[str, Callable[[], None]] = {
            "int8 settings": int8.settings,
            "int8 sensitivity": int8.sensitivity,
            "int8 exclusions": int8.exclusions,
            "prune layers": lambda: layer_phase(self, "prune", layers),
            "svd layers": lambda: layer_phase(self, "svd", sens.svd_layers(model)),
            "recovery": recovery.RecoverySearch(
                self.step, model, calibration, self.sensitivity, attempt, best, out_of_time, self.notes
            ).run,
            "formats": formats.FormatSearch(self.step, model, calibration, attempt, best, out_of_time).run,
            "int8 storage": int8.storage,
        }
        if families & {"prune", "svd"} and not calibration:
            self.notes.append(recovery.SKIPPED_NOTE)
        for name in [name for name, runs in planned.items() if runs]:
            self._run_phase(name, phases[name])
        self.time.finish()
        again = [name for name in self.time.unfinished() if name in _AGAIN]
        if again and self.time.left() > self.time.reserve:  # a second round on what the first one left
            self.time.plan([(name, _WEIGHTS[name]) for name in again])
            for name in again:
                self._run_phase(name, phases[name])
            self.time.finish()
        return choose(self)

    def _run_phase(self, name: str, phase: Callable[[], None]) -> None:
        self.time.begin(name)
        if name == "recovery":
            self.report("recovery: pruning and activation-aware svd refit to the original on calibration data")
        elif name == "formats":
            self.report("other formats: graph simplification, k-means, int4, fp16", phase=5)
        phase()

    # --- measuring one candidate --------------------------------------------------------------------------

    def attempt(self, label: str, steps: list[Step]) -> AutoCandidate:
        """Build and measure one candidate plan (once: the same steps again return the earlier record)."""
        dumped = [s.model_dump(mode="json") for s in steps]
        for earlier in self.candidates:
            if earlier.steps == dumped:
                return earlier
        work = self.time.work(auto_clock.candidate_kind(steps), key=json.dumps(dumped, sort_keys=True))
        if len(self.candidates) >= self.step.max_candidates or not work.fits():
            self.stopped_early = True
            return AutoCandidate(index=-1, label=label, steps=dumped, status="failed", error="not run", seconds=0)
        index = len(self.candidates)
        self.report(f"candidate {index + 1}: {label}")
        with work:
            try:
                fields, model = self._measure(self.inputs.build(self.plan(steps)))
            except CompressionError as e:
                logger.info("candidate %s failed: %s", label, e.message)
                fields, model = {"status": "failed", "error": e.message}, None
        candidate = AutoCandidate(index=index, label=label, steps=dumped, seconds=work.seconds, **fields)
        if model is not None and self.ranking.speed_ok(candidate):
            self.models[index] = model
        self.candidates.append(candidate)
        return candidate

    def _measure(self, proto: onnx.ModelProto) -> tuple[dict[str, object], bytes]:
        data = proto.SerializeToString()
        runner = Runner(data, threads=self.threads, what="compressed model")
        out = [runner.run(feed) for feed in self.inputs.dataset.feeds]
        judged = budget.judge(self.step, self.names, self.ref_out, out, self.inputs.dataset.labels)
        timing = runner if self.threads == 1 else Runner(data, threads=1, what="compressed model")
        fields: dict[str, object] = {
            "status": "measured", "size_bytes": len(data), "size_ratio": len(data) / self.original_size,
            **judged.fields(), **self.timed(timing),
        }  # fmt: skip
        return fields, data

    def timed(self, runner: Runner, settings: TimingSettings = _SEARCH_TIMING) -> dict[str, object]:
        """AutoCandidate's latency fields: the candidate's time over the original's (interleaved, one thread)."""
        if self._timing_reference is None:
            reference = self.inputs.reference
            self._timing_reference = reference if reference.threads == 1 else Runner(self.inputs.original, threads=1)
        c = compare_latency(self._timing_reference, runner, self.inputs.dataset.feeds[0], settings=settings).comparison
        return _speed_fields(c)

    # --- helpers for the phases ---------------------------------------------------------------------------

    def plan(self, steps: Sequence[Step]) -> Plan:
        """A plan of `steps` with the user's input shapes and evaluation options."""
        user = self.inputs.plan
        return Plan(steps=list(steps), input_shapes=user.input_shapes, evaluation=user.evaluation)

    def plan_from(self, dumped: list[dict[str, object]]) -> Plan:
        """The plan of a recorded candidate's steps."""
        user = self.inputs.plan
        return Plan.model_validate(
            {"steps": dumped, "input_shapes": user.input_shapes, "evaluation": user.evaluation.model_dump()}
        )

    def scorer(self) -> sens.Scorer:
        """Scores one-layer changes against the original on the sensitivity samples."""
        return sens.Scorer(self.inputs.reference, self.inputs.dataset.head(_SENSITIVITY_SAMPLES), self.threads)

    def out_of_time(self) -> bool:
        """True (and the search marked as stopped early) once the current phase's time or the budget is spent."""
        if self.time.out_of_time():
            self.stopped_early = True
            return True
        return False

    def elapsed(self) -> float:
        """Seconds since the search began, on the clock its time budget runs on."""
        return self.time.elapsed()

    def report(self, stage: str, phase: int | None = None) -> None:
        """Report a stage with the share of the search done.

        The search ends at its time budget, its candidate cap or after its last phase (of 6), whichever comes
        first, so the share done is the largest of the three.
        """
        if phase is not None:
            self.phase = max(self.phase, phase / _PHASES)
        elapsed = self.elapsed() / self.step.time_budget_s
        done = max(elapsed, len(self.candidates) / self.step.max_candidates, self.phase)
        self.inputs.progress(stage, min(done, 1.0))


def _speed_fields(c: LatencyComparison) -> dict[str, object]:
    """AutoCandidate's latency fields from a comparison with the original."""
    return {
        "latency_ratio": c.ratio, "latency_low": c.ratio_low, "latency_high": c.ratio_high,
        "latency_verdict": c.verdict, "faster": c.verdict == "faster",
    }  # fmt: skip
