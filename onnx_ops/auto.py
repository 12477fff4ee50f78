"""Accuracy-aware automatic compression: find the plan that meets the user's budget, measuring every candidate.

The search, all within the step's time budget and every figure measured with ONNX Runtime on this host:

0. the default plan (QuantizeStep's defaults): a candidate it beats on both size and accuracy is never chosen;
1. quantization settings through ``QuantizePass`` (dynamic per-channel and per-tensor; with calibration data,
   static QDQ and QOperator, per-channel and per-tensor, uint8 activations and int8 weights);
2. per-layer quantization sensitivity (see ``auto_sensitivity``), then, for the most promising settings that
   miss the budget: for static settings percentile calibration and weight layers only (other op types left
   in float), then the same settings with the 1, 2, 4, ... most sensitive layers left in float;
3. structured pruning (a quarter of the output channels) and then SVD of the layers whose one-layer
   pruning or factorization costs least, put before the best plan found so far;
4. with calibration data, recovery (see ``auto_recovery``): structured pruning and activation-aware SVD refit to
   the original, then the best final step; unstructured activation-aware pruning, distill and k-means;
5. the other formats where they fit the goal (see ``auto_formats``): graph simplification, k-means clusters,
   int4 and fp16.

Each candidate is built by the normal pipeline, loaded by ONNX Runtime, run on the evaluation samples (judged per
sample and per output, see ``auto_budget``) and timed
against the original in interleaved pairs on one ONNX Runtime thread, comparing the calling thread's CPU time
(see ``onnx_ops.timing``): a ratio with its 95% interval, so ties within noise are ties. The goals: `balanced`
takes the smallest candidate within budget that is not measurably slower; `fastest` needs a measured speed-up;
`smallest` ignores speed but takes no measurably slower model unless `allow_slower`. The chosen candidate's
speed is confirmed with a longer timing; when no candidate passes, the original model is kept, with a message.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

import onnx
import onnx_ir as ir
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry
from pydantic import TypeAdapter

from onnx_ops import auto_budget as budget
from onnx_ops import auto_formats as formats
from onnx_ops import auto_recovery as recovery
from onnx_ops import auto_sensitivity as sens
from onnx_ops.data import Dataset
from onnx_ops.errors import CompressionError
from onnx_ops.evaluate import Runner, compare_latency
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.quantize import STORABLE_OPS
from onnx_ops.plan import AutoStep, Plan, PruneStep, QuantizeStep, Step, SvdStep
from onnx_ops.report import AutoCandidate, AutoResult, LatencyComparison, LayerSensitivity
from onnx_ops.timing import TimingSettings

__all__ = ["SearchInputs", "SearchOutcome", "search"]

logger = logging.getLogger(__name__)

_SENSITIVITY_SAMPLES = 16
# Timing of one candidate against the original (interleaved pairs, one thread's CPU time), and the longer
# confirmation of the best ones: until the 95% interval is within 10% (5%) of the ratio or the seconds are spent.
_SEARCH_TIMING = TimingSettings(warmup=2, min_pairs=10, seconds=1.0, target_width=0.1)
_CONFIRM_TIMING = TimingSettings(warmup=2, min_pairs=20, seconds=3.0, target_width=0.05)
_SAME_SIZE = 0.02  # balanced: candidates within 2% of the smallest's size count as equally small (faster wins)
_SENSITIVITY_SHARE = 0.4  # of the time budget, at most, for quantization sensitivity (half that for SVD's)
_MAX_LAYERS = 16  # one-layer prune/svd sensitivity is measured on this many of the largest layers
_SVD_RANK_RATIO = 0.25  # saves parameters on square matrices (rank * (K + N) < K * N needs < 0.5)
_PRUNE_SPARSITY = 0.25  # structured: a quarter of the output channels of each chosen layer
_LAYER_LABELS = {"prune": f"structured prune {_PRUNE_SPARSITY:.0%}", "svd": f"svd rank x{_SVD_RANK_RATIO}"}
_CALIBRATION_CAP = 128
# What ONNX Runtime's quantizers handle; dynamic mode leaves Conv in float (ConvInteger is slow on x86 CPUs).
_DYNAMIC_OPS = (frozenset(IntegerOpsRegistry) | {"Gemm"}) - {"Conv"}
_STATIC_OPS = frozenset(QLinearOpsRegistry) | frozenset(QDQRegistry)
_WEIGHT_OPS = frozenset({"Conv", "MatMul", "Gemm"})


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
    """

    original: onnx.ModelProto
    plan: Plan
    context: PassContext
    dataset: Dataset
    reference: Runner
    build: Callable[[Plan], onnx.ModelProto]
    progress: Callable[[str, float], None]


@dataclasses.dataclass(frozen=True)
class SearchOutcome:
    """The chosen plan (None: keep the original model) and the record of the search."""

    plan: Plan | None
    result: AutoResult


def search(inputs: SearchInputs) -> SearchOutcome:
    """Search for the best plan within the auto step's budget; see the module docstring."""
    return _Search(inputs).run()


class _Search:
    def __init__(self, inputs: SearchInputs) -> None:
        step = inputs.plan.steps[0]
        assert isinstance(step, AutoStep)
        self.inputs, self.step = inputs, step
        self.started = time.perf_counter()
        self.deadline = self.started + step.time_budget_s
        self.threads = inputs.plan.evaluation.threads
        self.candidates: list[AutoCandidate] = []
        self.models: dict[int, bytes] = {}  # candidates worth confirming: measured and fast enough for the goal
        self._timing_reference: Runner | None = None  # the original on one thread, for timing
        self.sensitivity: list[LayerSensitivity] = []
        self.proxy_check: list[dict[str, float | str]] = []
        self.stopped_early = False
        self.activation_matmuls: list[str] = []
        self.tie_note = ""
        self.notes: list[str] = []  # what the search skipped, and why
        self.default: AutoCandidate | None = None  # the default plan's candidate: the bar every choice must pass
        self.names = inputs.reference.output_names
        self.ref_out = [inputs.reference.run(feed) for feed in inputs.dataset.feeds]
        self.original_size = inputs.original.ByteSize()
        self.phase = 0.0  # share of the search's phases begun, for progress

    # --- the phases ---------------------------------------------------------------------------------------

    def run(self) -> SearchOutcome:
        model = sens.prepared(self.inputs.original)
        self.activation_matmuls = sens.activation_matmuls(model)
        if "quantize" in self.step.families:
            self._report("quantization settings", phase=0)
            self.default = self._try(budget.DEFAULT_LABEL, [budget.default_step()])
            for label, step in self._quantize_settings({node.op_type for node in model.graph}):
                self._try(label, [step])
            self._quantize_sensitivity(model)
            self._exclusions()
        if "prune" in self.step.families:
            self._layers("prune", sens.quantizable_layers(model))
        if "svd" in self.step.families:
            self._layers("svd", sens.svd_layers(model))
        best = lambda: self._best(self._feasible())  # noqa: E731
        calibration = bool(self.inputs.context.calibration)
        if set(self.step.families) & {"prune", "svd"}:
            self._report("recovery: pruning and activation-aware svd refit to the original on calibration data")
            recovery.RecoverySearch(
                self.step, model, calibration, self.sensitivity, self._try, best, self._out_of_time, self.notes
            ).run()
        if set(self.step.families) & set(formats.FAMILIES):
            self._report("other formats: graph simplification, k-means, int4, fp16", phase=5)
            formats.FormatSearch(self.step, model, calibration, self._try, best, self._out_of_time).run()
        if "quantize" in self.step.families:
            self._int8_storage({node.op_type for node in model.graph} & STORABLE_OPS)
        return self._choose()

    def _quantize_settings(self, present: set[str]) -> list[tuple[str, QuantizeStep]]:
        # op_types are always explicit, so a candidate means the same whatever QuantizeStep's defaults become.
        dynamic_ops = sorted(present & _DYNAMIC_OPS)
        dynamic = [
            (
                f"dynamic {pc}",
                QuantizeStep(
                    mode="dynamic",
                    per_channel=pc == "per-channel",
                    weight_type="int8",
                    op_types=dynamic_ops,
                    speed_check=False,
                ),
            )
            for pc in ("per-channel", "per-tensor")
            if dynamic_ops
        ]
        calibration = self.inputs.context.calibration
        static_ops = sorted(present & _STATIC_OPS)
        # Signedness last: unsigned weights and signed activations are the slow choices on x86 (see the CPU
        # note), but they are measured like the rest in case this CPU differs.
        unsigned = [
            (f"{label}, uint8 weights", step.model_copy(update={"weight_type": "uint8"})) for label, step in dynamic[:1]
        ]
        if not calibration or not static_ops:
            return [*dynamic, *unsigned]
        samples = min(len(calibration), _CALIBRATION_CAP)
        static = [
            (
                f"static {fmt} {'per-channel' if pc else 'per-tensor'} minmax",
                QuantizeStep(
                    mode="static",
                    format=fmt,
                    per_channel=pc,
                    weight_type="int8",
                    activation_type="uint8",
                    calibration_method="minmax",
                    calibration_samples=samples,
                    op_types=static_ops,
                    speed_check=False,
                ),
            )
            for fmt, pc in (("qdq", True), ("qdq", False), ("qoperator", True), ("qoperator", False))
        ]
        signed = [
            ("static qdq per-channel int8 activations", static[0][1].model_copy(update={"activation_type": "int8"}))
        ]
        return [*dynamic[:1], static[0], *dynamic[1:], *static[1:], *unsigned, *signed]

    def _quantize_sensitivity(self, model: ir.Model) -> None:
        layers = sens.quantizable_layers(model)
        if not layers or self._out_of_time():
            return
        self._report(f"quantization sensitivity of {len(layers)} layers", phase=1)
        scorer = self._scorer()
        static = bool(self.inputs.context.calibration)  # static QDQ also rounds each node's output

        def one(layer: sens.Layer) -> onnx.ModelProto:
            return sens.fake_quantized(model, layer.name, True, static)

        found = sens.measure(layers, "quantize", one, scorer, self._until(_SENSITIVITY_SHARE))
        self.sensitivity += found
        self._check_proxy(model, layers, found, scorer)

    def _check_proxy(
        self, model: ir.Model, layers: Sequence[sens.Layer], found: list[LayerSensitivity], scorer: sens.Scorer
    ) -> None:
        """Real one-layer quantization of the 2 most and 2 least sensitive layers, to validate the proxy."""
        ranked = sorted(found, key=lambda s: s.loss, reverse=True)
        picks = ranked[:2] + ranked[-2:] if len(ranked) >= 4 else ranked
        static = bool(self.inputs.context.calibration)
        for item in picks:
            if self._out_of_time():
                return
            others = [x.name for x in layers if x.op_type == item.op_type and x.name != item.name]
            step = QuantizeStep(
                mode="static" if static else "dynamic", per_channel=True, op_types=[item.op_type],
                exclude_nodes=others, calibration_samples=_CALIBRATION_CAP if static else None, speed_check=False,
            )  # fmt: skip
            try:
                real, _ = scorer.loss(self.inputs.build(self._plan([step])))
            except CompressionError as e:
                logger.info("proxy check of %s failed: %s", item.name, e)
                continue
            self.proxy_check.append({"name": item.name, "proxy_loss": item.loss, "real_loss": real})

    def _exclusions(self) -> None:
        """Repair the best settings that miss the budget: other calibration, fewer op types, sensitive layers."""
        ranked = sorted((s for s in self.sensitivity if s.family == "quantize"), key=lambda s: s.loss, reverse=True)
        for base in self._promising():
            step, tried = _quantize_step(base), [base]
            if step.mode == "static":
                weights = sorted(set(step.op_types or ()) & _WEIGHT_OPS)
                variants = [
                    ("percentile", step.model_copy(update={"calibration_method": "percentile"})),
                    # Activation x activation MatMuls (attention) stay in float too: only weights are quantized.
                    (
                        "weight layers only",
                        step.model_copy(
                            update={
                                "op_types": weights,
                                "exclude_nodes": sorted({*step.exclude_nodes, *self.activation_matmuls}),
                            }
                        ),
                    ),
                ]
                for name, variant in variants:
                    if variant.op_types and not self._out_of_time():
                        tried.append(self._try(f"{base.label}, {name}", [variant]))
                if any(c.meets_budget for c in tried):
                    continue
            closest = max((c for c in tried if c.status == "measured"), key=self._closeness, default=base)
            self._exclude_sensitive(closest, ranked)

    def _exclude_sensitive(self, base: AutoCandidate, ranked: list[LayerSensitivity]) -> None:
        """The same settings with the 1, 2, 4, ... most sensitive layers left in float, until one fits."""
        step = _quantize_step(base)
        usable = [s.name for s in ranked if step.mode == "static" or s.op_type != "Conv"]
        k = 1
        while k <= max(1, len(usable) // 2) and not self._out_of_time():
            excluded = sorted({*step.exclude_nodes, *usable[:k]})
            label = f"{base.label}, {k} most sensitive layer(s) in float"
            if self._try(label, [step.model_copy(update={"exclude_nodes": excluded})]).meets_budget:
                break
            k *= 2

    def _promising(self) -> list[AutoCandidate]:
        """Up to two measured settings, fast enough for the goal, that miss the budget but would beat the best.

        The closest to the budget come first: search-time latencies of similar settings differ by noise, while
        a setting far outside the budget rarely comes back within it.
        """
        best = self._best(self._feasible())
        misses = [c for c in self.candidates if c.status == "measured" and self._speed_ok(c) and not c.meets_budget]
        if best is not None:
            misses = [c for c in misses if self._score(c) < self._score(best)]
        return sorted(misses, key=lambda c: (-self._closeness(c), *self._score(c)))[:2]

    def _layers(self, family: Literal["prune", "svd"], layers: list[sens.Layer]) -> None:
        """One-layer sensitivity of the largest layers, then the least sensitive ones together before the best."""
        if not layers or self._out_of_time():
            return
        names = [layer.name for layer in layers]
        largest = sorted(layers, key=lambda x: x.parameters, reverse=True)[:_MAX_LAYERS]
        self._report(f"{family} sensitivity of {len(largest)} layers", phase=3 if family == "prune" else 4)

        def one(layer: sens.Layer) -> onnx.ModelProto:
            return self.inputs.build(self._plan([_layer_step(family, names, [layer.name])]))

        found = sens.measure(largest, family, one, self._scorer(), self._until(_SENSITIVITY_SHARE / 2))
        self.sensitivity += found
        best = self._best(self._feasible())
        base = [] if best is None else _STEPS.validate_python(best.steps)
        # Layers the best plan leaves in float stay untouched: they were left alone for being sensitive.
        kept = {n for step in base for n in getattr(step, "exclude_nodes", ())}
        harmless = sorted((s for s in found if self._harmless(s) and s.name not in kept), key=lambda s: s.loss)
        for k in sorted({len(harmless), len(harmless) // 2, len(harmless) // 4, 1} - {0}, reverse=True):
            if self._out_of_time():
                return
            step = _layer_step(family, names, [s.name for s in harmless[:k]])
            label = f"{_LAYER_LABELS[family]} on {k} layer(s)" + (f" + {best.label}" if best is not None else "")
            if self._try(label, _insert(step, base)).meets_budget:
                break

    def _int8_storage(self, weight_ops: set[str]) -> None:
        """The two best plans that leave weight layers in float, with those layers' weights stored as int8.

        Same latency (ONNX Runtime folds the Cast and Mul back at load), smaller files, and a little more
        weight rounding, which is measured against the budget like every other candidate's.
        """
        for base in sorted(self._feasible(), key=self._score)[:2]:
            steps = _STEPS.validate_python(base.steps)
            last = steps[-1]
            if self._out_of_time() or not isinstance(last, QuantizeStep) or last.float_layer_weights == "int8":
                continue
            if (weight_ops <= set(last.op_types or ()) and not last.exclude_nodes) or last.op_types is None:
                continue  # every weight layer is quantized already, or the pass stores them int8 itself (auto)
            stored = last.model_copy(update={"float_layer_weights": "int8"})
            self._try(f"{base.label}, int8 storage of float layers", [*steps[:-1], stored])

    def _harmless(self, item: LayerSensitivity) -> bool:
        """A one-layer loss small enough that several such layers together may still fit the budget."""
        if self.step.budget == "accuracy":
            return item.accuracy_drop is not None and item.accuracy_drop <= self.step.max_accuracy_drop / 4
        return item.loss <= (1.0 - self.step.min_cosine) / 4

    # --- measuring one candidate --------------------------------------------------------------------------

    def _try(self, label: str, steps: list[Step]) -> AutoCandidate:
        dumped = [s.model_dump(mode="json") for s in steps]
        for earlier in self.candidates:
            if earlier.steps == dumped:
                return earlier
        if self._out_of_time() or len(self.candidates) >= self.step.max_candidates:
            self.stopped_early = True
            return AutoCandidate(index=-1, label=label, steps=dumped, status="failed", error="not run", seconds=0)
        started = time.perf_counter()
        index = len(self.candidates)
        self._report(f"candidate {index + 1}: {label}")
        try:
            fields, model = self._measure(self.inputs.build(self._plan(steps)))
        except CompressionError as e:
            logger.info("candidate %s failed: %s", label, e.message)
            fields, model = {"status": "failed", "error": e.message}, None
        candidate = AutoCandidate(
            index=index, label=label, steps=dumped, seconds=time.perf_counter() - started, **fields
        )
        if model is not None and self._speed_ok(candidate):
            self.models[index] = model
        self.candidates.append(candidate)
        return candidate

    def _measure(self, proto: onnx.ModelProto) -> tuple[dict[str, object], bytes]:
        data = proto.SerializeToString()
        runner = Runner(data, threads=self.threads, what="compressed model")
        out = [runner.run(feed) for feed in self.inputs.dataset.feeds]
        judged = budget.judge(self.step, self.names, self.ref_out, out, self.inputs.dataset.labels)
        speed = self._speed(runner if self.threads == 1 else Runner(data, threads=1, what="compressed model"))
        fields: dict[str, object] = {
            "status": "measured", "size_bytes": len(data), "size_ratio": len(data) / self.original_size,
            **judged.fields(), **_speed_fields(speed),
        }  # fmt: skip
        return fields, data

    def _speed(self, runner: Runner, settings: TimingSettings = _SEARCH_TIMING) -> LatencyComparison:
        """The candidate's time over the original's: interleaved pairs, one thread's CPU time (both 1 thread)."""
        if self._timing_reference is None:
            reference = self.inputs.reference
            self._timing_reference = reference if reference.threads == 1 else Runner(self.inputs.original, threads=1)
        return compare_latency(
            self._timing_reference, runner, self.inputs.dataset.feeds[0], settings=settings
        ).comparison

    def _speed_ok(self, c: AutoCandidate) -> bool:
        """Fast enough for the goal: measurably faster (fastest), or not measurably slower (the others)."""
        if self.step.goal == "fastest":
            return c.latency_verdict == "faster"
        return c.latency_verdict != "slower" or (self.step.goal == "smallest" and self.step.allow_slower)

    # --- choosing -----------------------------------------------------------------------------------------

    def _feasible(self) -> list[AutoCandidate]:
        return [
            c
            for c in self.candidates
            if c.status == "measured" and c.meets_budget and self._speed_ok(c) and self._fair(c)
        ]

    def _recorded(self) -> list[AutoCandidate]:
        """The candidates, those the default plan beats on size and accuracy marked so."""
        if self.default is None:
            return self.candidates
        mark = {"dominated_by": self.default.index}
        return [c if self._fair(c) else c.model_copy(update=mark) for c in self.candidates]

    def _fair(self, c: AutoCandidate) -> bool:
        """False when the default plan beats `c` on both size and accuracy (then `c` is never returned)."""
        return self.default is None or not budget.dominates(self.default, c)

    def _score(self, c: AutoCandidate) -> tuple[float, float]:
        size, latency = c.size_ratio or 1.0, c.latency_ratio or 1.0
        return (latency, size) if self.step.goal == "fastest" else (size, latency)

    def _best(self, pool: list[AutoCandidate]) -> AutoCandidate | None:
        return min(pool, key=self._score, default=None)

    def _closeness(self, c: AutoCandidate) -> float:
        return budget.closeness(c, self.step)

    def _choose(self) -> SearchOutcome:
        self._report("confirming the latency of the best candidates", phase=5)
        feasible = sorted(self._feasible(), key=self._score)
        status: Literal["met", "not_met"] = "met"
        if not feasible:
            status = "not_met"
            closest = [c for c in self.candidates if c.index in self.models and self._fair(c)]
            feasible = sorted(closest, key=lambda c: (-self._closeness(c), *self._score(c)))
        # Search timing is short: time the top three again, longer, and keep those still fast enough for the goal
        # (the closest to the budget wins when none meets it).
        pool = feasible[:3]
        if status == "met" and self.step.goal == "fastest" and feasible[3:]:  # and the smallest tied with the best
            tied = [c for c in feasible[3:] if (c.latency_low or 1) <= (feasible[0].latency_high or 1)]
            pool += [min(tied, key=lambda c: c.size_ratio or 1)] if tied else []
        confirmed: list[AutoCandidate] = []
        for candidate in pool:
            runner = Runner(self.models[candidate.index], threads=1, what="compressed model")
            again = candidate.model_copy(update=_speed_fields(self._speed(runner, _CONFIRM_TIMING)))
            self.candidates[candidate.index] = again
            if self._speed_ok(again):
                confirmed.append(again)
            else:
                logger.info("candidate %d: %s on confirmation", candidate.index, again.latency_verdict)
        if not confirmed:
            return self._outcome("original", None)
        return self._outcome(status, self._pick(confirmed) if status == "met" else confirmed[0])

    def _pick(self, confirmed: list[AutoCandidate]) -> AutoCandidate:
        """The best by confirmed figures (balanced: the fastest within _SAME_SIZE of the smallest).

        For `fastest`, a smaller candidate that is not measurably slower than the fastest head-to-head wins.
        """
        best = min(confirmed, key=self._score)
        if self.step.goal == "balanced":
            alike = [c for c in confirmed if (c.size_ratio or 1) <= (best.size_ratio or 1) * (1 + _SAME_SIZE)]
            return min(alike, key=lambda c: (c.latency_ratio or 1, c.size_ratio or 1))
        if self.step.goal != "fastest":
            return best
        for candidate in sorted(confirmed, key=lambda c: c.size_ratio or 1):
            if (candidate.size_ratio or 1) >= (best.size_ratio or 1) * 0.99:
                break
            # Two compressed models timed against each other: finer than two ratios to the original.
            fast = Runner(self.models[best.index], threads=1, what="compressed model")
            small = Runner(self.models[candidate.index], threads=1, what="compressed model")
            feed = self.inputs.dataset.feeds[0]
            head = compare_latency(fast, small, feed, settings=_CONFIRM_TIMING).comparison
            logger.info("candidate %d against %d head-to-head: %.3f", candidate.index, best.index, head.ratio)
            if head.verdict != "slower":
                self.tie_note = (
                    f"; smaller than candidate {best.index} and not measurably slower head-to-head (time ratio "
                    f"{head.ratio:.3f}, 95% interval {head.ratio_low:.3f}-{head.ratio_high:.3f})"
                )
                return candidate
        return best

    def _outcome(self, status: Literal["met", "not_met", "original"], chosen: AutoCandidate | None) -> SearchOutcome:
        slower_ok = self.step.goal == "smallest" and self.step.allow_slower
        plan = None if chosen is None else self._plan_from(chosen.steps)
        result = AutoResult(
            budget=self.step.budget_text,
            threshold=self.step.max_accuracy_drop if self.step.budget == "accuracy" else self.step.min_cosine,
            goal=_GOALS["smallest, slower allowed" if slower_ok else self.step.goal],
            status=status,
            message=self._message(status, chosen),
            chosen=None if chosen is None else chosen.index,
            plan=None if plan is None else plan.model_dump(mode="json"),
            candidates=self._recorded(),
            sensitivity=self.sensitivity,
            sensitivity_method=(
                "quantize: proxy (int8 rounding of one layer's weight and input activation, run in ONNX Runtime); "
                f"prune: the real structured pass on one layer ({_PRUNE_SPARSITY:.0%} of its channels); svd: the "
                f"real pass on one layer at rank ratio {_SVD_RANK_RATIO}. Loss = 1 - worst float output cosine on "
                f"{min(_SENSITIVITY_SAMPLES, len(self.inputs.dataset.feeds))} evaluation samples."
            ),
            proxy_check=self.proxy_check,
            search_seconds=time.perf_counter() - self.started,
            time_budget_s=self.step.time_budget_s,
            stopped_early=self.stopped_early,
            notes=self.notes,
        )
        return SearchOutcome(plan=plan, result=result)

    def _message(self, status: str, chosen: AutoCandidate | None) -> str:
        tried = f"{len(self.candidates)} candidate(s) in {time.perf_counter() - self.started:.0f} s"
        if chosen is None:
            need = "measurably faster than" if self.step.goal == "fastest" else "not measurably slower than"
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
        what += self.tie_note
        if status == "met":
            return f"{what}; meets the budget ({self.step.budget_text}); {tried}"
        return f"NO candidate met the budget ({self.step.budget_text}); returning the closest, {what}; {tried}"

    # --- helpers ------------------------------------------------------------------------------------------

    def _plan(self, steps: Sequence[Step]) -> Plan:
        user = self.inputs.plan
        return Plan(steps=list(steps), input_shapes=user.input_shapes, evaluation=user.evaluation)

    def _plan_from(self, dumped: list[dict[str, object]]) -> Plan:
        user = self.inputs.plan
        return Plan.model_validate(
            {"steps": dumped, "input_shapes": user.input_shapes, "evaluation": user.evaluation.model_dump()}
        )

    def _scorer(self) -> sens.Scorer:
        return sens.Scorer(self.inputs.reference, self.inputs.dataset.head(_SENSITIVITY_SAMPLES), self.threads)

    def _until(self, share: float) -> Callable[[], bool]:
        """An out-of-time test for one phase: at most `share` of the time budget from now."""
        end = min(self.deadline, time.perf_counter() + share * self.step.time_budget_s)

        def out() -> bool:
            return self._out_of_time() or time.perf_counter() >= end

        return out

    def _out_of_time(self) -> bool:
        if time.perf_counter() >= self.deadline:
            self.stopped_early = True
            return True
        return False

    def _report(self, stage: str, phase: int | None = None) -> None:
        """Report a stage with the share of the search done.

        The search ends at its time budget, its candidate cap or after its last phase (of 6), whichever comes
        first, so the share done is the largest of the three.
        """
        if phase is not None:
            self.phase = max(self.phase, phase / 6)
        elapsed = (time.perf_counter() - self.started) / self.step.time_budget_s
        done = max(elapsed, len(self.candidates) / self.step.max_candidates, self.phase)
        self.inputs.progress(stage, min(done, 1.0))


_STEPS: TypeAdapter[list[Step]] = TypeAdapter(list[Step])
_GOALS = {
    "balanced": "balanced: the smallest within budget that is not measurably slower",
    "fastest": "fastest: the lowest latency among those measurably faster",
    "smallest": "smallest: the fewest bytes, not measurably slower",
    "smallest, slower allowed": "smallest: the fewest bytes, slower allowed",
}


def _speed_fields(c: LatencyComparison) -> dict[str, object]:
    """AutoCandidate's latency fields from a comparison with the original."""
    return {
        "latency_ratio": c.ratio, "latency_low": c.ratio_low, "latency_high": c.ratio_high,
        "latency_verdict": c.verdict, "faster": c.verdict == "faster",
    }  # fmt: skip


def _quantize_step(candidate: AutoCandidate) -> QuantizeStep:
    return QuantizeStep.model_validate(candidate.steps[-1])


def _layer_step(family: Literal["prune", "svd"], all_layers: Sequence[str], chosen: Sequence[str]) -> Step:
    if family == "prune":
        return PruneStep(method="structured", sparsity=_PRUNE_SPARSITY, only_nodes=sorted(chosen))
    keep = set(chosen)
    return SvdStep(rank_ratio=_SVD_RANK_RATIO, exclude_nodes=[n for n in all_layers if n not in keep])


def _insert(step: Step, steps: list[Step]) -> list[Step]:
    """`steps` with `step` put where the order optimize, prune, svd, final step wants it."""
    order = {"optimize": -1, "prune": 0, "svd": 1}  # then the final step
    at = next((i for i, s in enumerate(steps) if order.get(s.kind, 2) > order.get(step.kind, 2)), len(steps))
    return [*steps[:at], step, *steps[at:]]
