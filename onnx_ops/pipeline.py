"""The one entry point: validate the model and data, run the plan's passes, check and measure the result."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes import common
from pydantic import BaseModel, ValidationError

from onnx_ops.agreement import accuracy, measure_agreement
from onnx_ops.cpu import cpu_note
from onnx_ops.data import Dataset, InputSpec, input_specs, load_dataset, resolve_shapes, synthesize
from onnx_ops.errors import CompressionError, InvalidModelError, PassFailedError, PlanError, ResourceLimitError
from onnx_ops.evaluate import (
    Runner,
    compare_latency,
    cpu_name,
    default_threads,
    memory_limit_text,
    model_stats,
    out_of_memory,
)
from onnx_ops.external import save_model
from onnx_ops.passes._base import PassContext, PassLog
from onnx_ops.plan import AutoStep, DistillStep, Fp16Step, Int4Step, Plan, PruneStep, QuantizeStep, SvdStep
from onnx_ops.plan_errors import explain
from onnx_ops.progress import Progress, Tracker
from onnx_ops.report import Agreement, AutoResult, EvaluationData, Report, StepResult
from onnx_ops.timing import TimingSettings, latency_warnings
from onnx_ops.validate import Limits, clean_message, load_model, validate_model

__all__ = ["CompressionResult", "DataSource", "ModelSource", "compress", "parse_plan", "save_report"]

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto
DataSource = str | os.PathLike[str] | Mapping[str, np.ndarray]
# Shares of the whole job (see onnx_ops.progress): checking the inputs, the steps (or the search and the
# chosen plan's run), measuring both models.
_VALIDATE, _STEPS, _SEARCH, _MEASURE, _MEASURED = 0.05, 0.75, 0.70, 0.97, 0.98


def _pass_registry() -> dict[type[BaseModel], Callable[[Any, PassContext], Any]]:
    """Plan step type -> pass class, an explicit table (imported on first use: quantize pulls in ORT's tools)."""
    from onnx_ops.passes.distill import DistillPass
    from onnx_ops.passes.fp16 import Fp16ConvertPass
    from onnx_ops.passes.int4 import Int4QuantizePass
    from onnx_ops.passes.prune import MagnitudePrunePass
    from onnx_ops.passes.quantize import QuantizePass
    from onnx_ops.passes.svd import SvdFactorizePass

    return {
        PruneStep: MagnitudePrunePass,
        SvdStep: SvdFactorizePass,
        DistillStep: DistillPass,
        QuantizeStep: QuantizePass,
        Int4Step: Int4QuantizePass,
        Fp16Step: Fp16ConvertPass,
    }


@dataclasses.dataclass(frozen=True)
class CompressionResult:
    """The compressed model and the report measured on it."""

    model: onnx.ModelProto
    report: Report

    def save(self, path: str | os.PathLike[str], *, external_data: bool | None = None) -> bool:
        """Write the model atomically (temp file, then rename), so no reader sees half a file.

        Args:
            path: Where to write the model.
            external_data: True: its weights go to a data file beside it, named after it (``<name>.data``).
                False: one self-contained file. None: external data only past protobuf's 2 GiB limit.

        Returns:
            Whether the model was written with external data.
        """
        return save_model(self.model, path, external_data=external_data)


def parse_plan(plan: Plan | Mapping[str, Any] | str) -> Plan:
    """A Plan from a Plan, a dict, or a JSON string; PlanError naming each problem (and a close match) otherwise."""
    if isinstance(plan, Plan):
        return plan
    try:
        return Plan.model_validate_json(plan) if isinstance(plan, str) else Plan.model_validate(plan)
    except ValidationError as e:
        raise PlanError(f"invalid plan: {explain(e)}") from e


def compress(
    model: ModelSource,
    plan: Plan | Mapping[str, Any] | str,
    *,
    calibration: DataSource | None = None,
    evaluation: DataSource | None = None,
    limits: Limits | None = None,
    progress: Progress | None = None,
) -> CompressionResult:
    """Compress a model by a plan and measure what it cost.

    Args:
        model: A path to an .onnx file (its external data files, if any, beside it in its folder), the bytes
            of a self-contained model, or a ModelProto with every tensor inside.
        plan: The plan (a Plan, its dict, or its JSON text).
        calibration: Calibration data for static quantization: an .npz path or a mapping of arrays.
        evaluation: Evaluation data (optionally with "labels"): an .npz path or a mapping of arrays.
        limits: Caps on untrusted input.
        progress: Called with (stage in words, fraction of the job done) as the work goes on; the fraction only
            grows, and a stage with a countable total ends in "done/total" (see onnx_ops.progress).

    Raises:
        CompressionError: a subclass naming what is wrong with the model, plan, data, or a failing pass.
    """
    started = time.perf_counter()
    limits = limits or Limits()
    tracker = Tracker(progress)
    plan = parse_plan(plan)
    with tempfile.TemporaryDirectory(prefix="onnx-compress-") as tmp:
        workdir = Path(tmp)
        tracker.stage("validate")
        original = _load(model, workdir, limits)
        reference = Runner(original, threads=plan.evaluation.threads, what="model")
        specs = input_specs(original)
        calib = _dataset(calibration, specs, "calibration", limits)
        evaluation_set = _dataset(evaluation, specs, "evaluation", limits)
        shapes = resolve_shapes(specs, plan.input_shapes, [d for d in (evaluation_set, calib) if d is not None])
        if plan.needs_calibration and calib is None:
            user = plan.calibration_user
            quantizers = ("static quantization", "int4 with method gptq")
            hint = ", or use mode 'dynamic' (method 'rtn' for int4)" if user in quantizers else ""
            raise PlanError(
                f"{user} needs calibration data: give a .npz with one array per model input "
                f"({', '.join(s.name for s in specs)}){hint}"
            )
        context = PassContext(
            workdir=workdir, calibration=calib.feeds if calib else None, input_shapes=shapes, teacher=original
        )
        data, eval_set = _evaluation_inputs(plan, specs, shapes, evaluation_set, calib, limits)
        auto: AutoResult | None = None
        if isinstance(plan.steps[0], AutoStep):
            work = tracker.part(_VALIDATE, _STEPS)
            compressed, steps, auto = _run_auto(original, plan, context, eval_set, reference, work)
        else:
            compressed, steps = _run_plan(original, plan, context, tracker.part(_VALIDATE, _STEPS))
        measuring = tracker.part(_STEPS, _MEASURE, "measuring")
        measuring.stage("loading the compressed model")
        candidate = Runner(compressed, threads=plan.evaluation.threads, what="compressed model")
        report = _measure(original, compressed, reference, candidate, plan, steps, data, eval_set, measuring)
    if auto is not None:
        warnings = report.warnings if auto.status == "met" else [auto.message, *report.warnings]
        report = report.model_copy(update={"auto": auto, "warnings": warnings})
    report = report.model_copy(update={"total_seconds": time.perf_counter() - started})
    tracker.stage("measured", _MEASURED)
    return CompressionResult(model=compressed, report=report)


def _run_auto(
    original: onnx.ModelProto, plan: Plan, context: PassContext, dataset: Dataset, reference: Runner, tracker: Tracker
) -> tuple[onnx.ModelProto, list[StepResult], AutoResult]:
    """Search for the best plan, then run it again as a normal plan (which also shows it reruns)."""
    from onnx_ops.auto import SearchInputs, search

    step = plan.steps[0]
    assert isinstance(step, AutoStep)
    if step.budget == "accuracy":
        _check_labels(dataset, reference)

    searching = tracker.part(0.0, _SEARCH / _STEPS, "auto")

    def build(candidate: Plan) -> onnx.ModelProto:
        # A candidate's steps report within the search's current stage (the candidate being built).
        return _run_plan(original, candidate, context, searching.here())[0]

    outcome = search(SearchInputs(original, plan, context, dataset, reference, build, searching.stage))
    if outcome.plan is None:
        return original, [], outcome.result
    compressed, steps = _run_plan(
        original, outcome.plan, context, tracker.part(_SEARCH / _STEPS, 1.0, "auto: the chosen plan")
    )
    return compressed, steps, outcome.result


def _check_labels(dataset: Dataset, reference: Runner) -> None:
    if dataset.labels is None:
        raise PlanError(
            "auto with budget 'accuracy' needs labelled evaluation data: give an evaluation .npz with a "
            "'labels' array (one class per sample), or use budget 'cosine'"
        )
    outputs = [reference.run(feed) for feed in dataset.feeds[:1]]
    if accuracy(reference.output_names, dataset.labels[:1], outputs, outputs) is None:
        raise PlanError(
            "auto with budget 'accuracy': no output of the model looks like class scores or class labels that "
            "match the labels' shape; use budget 'cosine'"
        )


def _load(model: ModelSource, workdir: Path, limits: Limits) -> onnx.ModelProto:
    # Always load from a file inside a private directory: nothing an uploaded model names can resolve
    # against the caller's working directory.
    if isinstance(model, onnx.ModelProto):
        validate_model(model, limits)
        return model
    if isinstance(model, bytes):
        path = workdir / "input.onnx"
        path.write_bytes(model)
        return load_model(path, limits)
    if not Path(model).is_file():
        raise InvalidModelError("the model file does not exist")
    return load_model(model, limits)


def _dataset(source: DataSource | None, specs: list[InputSpec], role: str, limits: Limits) -> Dataset | None:
    if source is None:
        return None
    if not isinstance(source, Mapping) and not Path(source).is_file():
        raise PlanError(f"the {role} file does not exist")
    return load_dataset(source, specs, role=role, max_bytes=limits.max_data_bytes)


def _run_plan(
    original: onnx.ModelProto, plan: Plan, context: PassContext, tracker: Tracker
) -> tuple[onnx.ModelProto, list[StepResult]]:
    model = ir.from_proto(original)
    # Weights that exporters put in Constant nodes become initializers, so every pass (and ORT's
    # quantizer, which raises on them) sees one kind of weight.
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    # Old exporters list initializers as graph inputs too (overridable defaults); ONNX Runtime never needs
    # them fed, and only constants can be compressed.
    common.RemoveInitializersFromInputsPass()(model)
    registry = _pass_registry()
    count = len(plan.steps)
    # Each step reports within an equal share of this part of the job.
    parts = [
        tracker.part(i / count, (i + 1) / count, f"step {i + 1}/{count}: {s.kind}" if count > 1 else s.kind)
        for i, s in enumerate(plan.steps)
    ]
    passes = [
        registry[type(step)](step, dataclasses.replace(context, progress=part))
        for step, part in zip(plan.steps, parts, strict=True)
    ]
    for step_pass in passes:  # refuse an impossible plan before any work
        step_pass.precheck(model)
    results = []
    for index, (step, step_pass) in enumerate(zip(plan.steps, passes, strict=True)):
        parts[index].stage("")
        before = _parameters(model)
        start = time.perf_counter()
        try:
            model = step_pass(model).model
            common.RemoveUnusedNodesPass()(model)
        except CompressionError:
            raise
        except Exception as e:
            logger.exception("step %d (%s) failed", index + 1, step.kind)
            if out_of_memory(e):
                raise ResourceLimitError(
                    f"step {index + 1} ({step.kind}) ran out of memory{memory_limit_text()}: give the job more "
                    "memory, or compress a smaller model"
                ) from e
            raise PassFailedError(f"step {index + 1} ({step.kind}) failed: {clean_message(e)}") from e
        log: PassLog = step_pass.log
        results.append(
            StepResult(
                index=index + 1,
                kind=step.kind,
                config=step.model_dump(mode="json"),
                seconds=time.perf_counter() - start,
                parameters_before=before,
                parameters_after=_parameters(model),
                layers=log.layers,
                skipped=log.skipped,
                warnings=log.warnings,
                summary=log.summary,
            )
        )
    common.RemoveUnusedOpsetsPass()(model)  # e.g. paddle2onnx's 'Paddle' import, which no node uses
    proto = ir.to_proto(model)
    try:
        onnx.checker.check_model(proto, full_check=False)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise PassFailedError(f"the compressed model fails the ONNX checker: {clean_message(e)}") from e
    return proto, results


def _parameters(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)


def _evaluation_inputs(
    plan: Plan,
    specs: list[InputSpec],
    shapes: dict[str, list[int]],
    evaluation: Dataset | None,
    calibration: Dataset | None,
    limits: Limits,
) -> tuple[EvaluationData, Dataset]:
    options = plan.evaluation
    given = evaluation or calibration
    if evaluation is not None:
        chosen, source = evaluation.head(options.max_samples), "evaluation"
        note = "measured on the evaluation data given"
    elif calibration is not None:
        chosen, source = Dataset(calibration.feeds[: options.max_samples]), "calibration"
        note = "no evaluation data was given: agreement is measured on the calibration data (no labels)"
    else:
        feeds = synthesize(specs, shapes, options.synthetic_samples, options.seed, limits.max_sample_elements)
        chosen, source = Dataset(feeds), "synthetic"
        note = (
            "no evaluation or calibration data was given: agreement is measured on synthesized random "
            "inputs, which may not reflect real data; give an evaluation file for a trustworthy figure"
        )
    available = len(given.feeds) if given is not None else len(chosen.feeds)
    if available > len(chosen.feeds):
        note += f"; the first {len(chosen.feeds)} of its {available} samples (evaluation.max_samples)"
    sample_shapes = {name: list(array.shape) for name, array in chosen.feeds[0].items()}
    data = EvaluationData(
        source=source, samples=len(chosen.feeds), available=available, note=note, input_shapes=sample_shapes
    )
    return data, chosen


def _measure(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    reference: Runner,
    candidate: Runner,
    plan: Plan,
    steps: list[StepResult],
    data: EvaluationData,
    dataset: Dataset,
    tracker: Tracker,
) -> Report:
    if candidate.output_names != reference.output_names:
        raise PassFailedError(
            f"the compressed model's outputs {candidate.output_names} differ from the original's "
            f"{reference.output_names}"
        )
    options = plan.evaluation
    # Shares by the model runs each part makes: every sample on both models, then the timed runs of both.
    samples, timed_runs = len(dataset.feeds), options.latency_runs + options.warmup_runs
    outputs = samples / (samples + timed_runs)
    ref_out = _outputs(reference, dataset, tracker.part(0.0, outputs / 2, "original model on sample"))
    new_out = _outputs(candidate, dataset, tracker.part(outputs / 2, outputs, "compressed model on sample"))
    names = reference.output_names
    meter = measure_agreement(names, ref_out, new_out)
    acc = accuracy(names, dataset.labels, ref_out, new_out) if dataset.labels is not None else None
    first = dataset.feeds[0]
    batch = next(iter(first.values())).shape[0] if first and next(iter(first.values())).ndim else 1
    tracker.stage(f"latency, at least {options.latency_runs} interleaved pairs", outputs)
    settings = TimingSettings(options.warmup_runs, options.latency_runs, seconds=options.latency_seconds)
    timed = compare_latency(reference, candidate, first, settings=settings, batch=batch)
    warnings = [w for s in steps for w in s.warnings]
    if data.source == "synthetic":
        warnings.append(data.note)
    warnings += latency_warnings(timed.comparison)
    if dataset.labels is not None and acc is None:
        warnings.append("labels were given but no output looks like class scores or class labels; no accuracy measured")
    return Report(
        tool_versions={
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "onnx_ir": ir.__version__,
            "numpy": np.__version__,
        },
        host={
            "cpu": cpu_name(),
            "cores": default_threads(),
            "threads": options.threads or default_threads(),
            "provider": "CPUExecutionProvider",
        },
        plan=plan.model_dump(mode="json"),
        before=model_stats(original),
        after=model_stats(compressed),
        steps=steps,
        data=data,
        latency_before=timed.baseline,
        latency_after=timed.candidate,
        latency=timed.comparison,
        agreement=Agreement(outputs=meter.floating(), exact=meter.exact(), accuracy=acc),
        warnings=warnings,
        total_seconds=0.0,
        cpu=cpu_note(),
    )


def _outputs(runner: Runner, dataset: Dataset, tracker: Tracker) -> list[list[object]]:
    outputs = []
    for index, feed in enumerate(dataset.feeds):
        tracker.count("", index, len(dataset.feeds))
        outputs.append(runner.run(feed))
    tracker.count("", len(dataset.feeds), len(dataset.feeds))
    return outputs


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_report(report: Report, path: str | os.PathLike[str]) -> None:
    """Write the report as indented JSON, atomically."""
    _atomic_write(Path(path), report.model_dump_json(indent=2).encode())
