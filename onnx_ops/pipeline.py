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

from onnx_ops.cpu import cpu_note
from onnx_ops.data import Dataset, InputSpec, input_specs, load_dataset, resolve_shapes, synthesize
from onnx_ops.errors import CompressionError, InvalidModelError, PassFailedError, PlanError
from onnx_ops.evaluate import Runner, accuracy, agreement, cpu_name, default_threads, measure_latency, model_stats
from onnx_ops.passes._base import PassContext, PassLog
from onnx_ops.plan import AutoStep, DistillStep, Plan, PruneStep, QuantizeStep, SvdStep
from onnx_ops.report import Agreement, AutoResult, EvaluationData, Report, StepResult
from onnx_ops.validate import Limits, clean_message, load_model, validate_model

__all__ = ["CompressionResult", "DataSource", "ModelSource", "compress", "parse_plan", "save_report"]

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto
DataSource = str | os.PathLike[str] | Mapping[str, np.ndarray]
Progress = Callable[[str, float], None]


def _pass_registry() -> dict[type[BaseModel], Callable[[Any, PassContext], Any]]:
    """Plan step type -> pass class, an explicit table (imported on first use: quantize pulls in ORT's tools)."""
    from onnx_ops.passes.distill import DistillPass
    from onnx_ops.passes.prune import MagnitudePrunePass
    from onnx_ops.passes.quantize import QuantizePass
    from onnx_ops.passes.svd import SvdFactorizePass

    return {
        PruneStep: MagnitudePrunePass,
        SvdStep: SvdFactorizePass,
        DistillStep: DistillPass,
        QuantizeStep: QuantizePass,
    }


@dataclasses.dataclass(frozen=True)
class CompressionResult:
    """The compressed model and the report measured on it."""

    model: onnx.ModelProto
    report: Report

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model atomically (temp file, then rename), so no reader sees half a file."""
        _atomic_write(Path(path), self.model.SerializeToString())


def parse_plan(plan: Plan | Mapping[str, Any] | str) -> Plan:
    """A Plan from a Plan, a dict, or a JSON string; PlanError with pydantic's reasons otherwise."""
    if isinstance(plan, Plan):
        return plan
    try:
        return Plan.model_validate_json(plan) if isinstance(plan, str) else Plan.model_validate(plan)
    except ValidationError as e:
        reasons = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'plan'}: {err['msg']}" for err in e.errors())
        raise PlanError(f"invalid plan: {reasons}") from e


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
        model: A path to a self-contained .onnx file, its bytes, or a ModelProto.
        plan: The plan (a Plan, its dict, or its JSON text).
        calibration: Calibration data for static quantization: an .npz path or a mapping of arrays.
        evaluation: Evaluation data (optionally with "labels"): an .npz path or a mapping of arrays.
        limits: Caps on untrusted input.
        progress: Called with (stage, fraction done) as the work goes on.

    Raises:
        CompressionError: a subclass naming what is wrong with the model, plan, data, or a failing pass.
    """
    started = time.perf_counter()
    limits = limits or Limits()
    report_progress = progress or (lambda stage, fraction: None)
    plan = parse_plan(plan)
    with tempfile.TemporaryDirectory(prefix="onnx-compress-") as tmp:
        workdir = Path(tmp)
        report_progress("validate", 0.0)
        original = _load(model, workdir, limits)
        reference = Runner(original, threads=plan.evaluation.threads, what="model")
        specs = input_specs(original)
        calib = _dataset(calibration, specs, "calibration", limits)
        evaluation_set = _dataset(evaluation, specs, "evaluation", limits)
        shapes = resolve_shapes(specs, plan.input_shapes, [d for d in (evaluation_set, calib) if d is not None])
        if plan.needs_calibration and calib is None:
            distill = any(isinstance(s, DistillStep) for s in plan.steps)
            raise PlanError(
                f"{'distill' if distill else 'static quantization'} needs calibration data: give a .npz with one "
                f"array per model input ({', '.join(s.name for s in specs)})"
                + ("" if distill else ", or use mode 'dynamic'")
            )
        context = PassContext(
            workdir=workdir, calibration=calib.feeds if calib else None, input_shapes=shapes, teacher=original
        )
        data, eval_set = _evaluation_inputs(plan, specs, shapes, evaluation_set, calib, limits)
        auto: AutoResult | None = None
        if isinstance(plan.steps[0], AutoStep):
            compressed, steps, auto = _run_auto(original, plan, context, eval_set, reference, report_progress)
        else:
            compressed, steps = _run_plan(original, plan, context, report_progress)
        report_progress("evaluate", 0.75)
        candidate = Runner(compressed, threads=plan.evaluation.threads, what="compressed model")
        report = _measure(original, compressed, reference, candidate, plan, steps, data, eval_set)
    if auto is not None:
        warnings = report.warnings if auto.status == "met" else [auto.message, *report.warnings]
        report = report.model_copy(update={"auto": auto, "warnings": warnings})
    report = report.model_copy(update={"total_seconds": time.perf_counter() - started})
    report_progress("measured", 0.95)
    return CompressionResult(model=compressed, report=report)


def _run_auto(
    original: onnx.ModelProto, plan: Plan, context: PassContext, dataset: Dataset, reference: Runner, progress: Progress
) -> tuple[onnx.ModelProto, list[StepResult], AutoResult]:
    """Search for the best plan, then run it again as a normal plan (which also shows it reruns)."""
    from onnx_ops.auto import SearchInputs, search

    step = plan.steps[0]
    assert isinstance(step, AutoStep)
    if step.budget == "accuracy":
        _check_labels(dataset, reference)

    def build(candidate: Plan) -> onnx.ModelProto:
        return _run_plan(original, candidate, context, lambda stage, fraction: None)[0]

    outcome = search(SearchInputs(original, plan, context, dataset, reference, build, progress))
    if outcome.plan is None:
        return original, [], outcome.result
    progress("auto: running the chosen plan", 0.72)
    compressed, steps = _run_plan(original, outcome.plan, context, lambda stage, fraction: None)
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
    original: onnx.ModelProto, plan: Plan, context: PassContext, progress: Progress
) -> tuple[onnx.ModelProto, list[StepResult]]:
    model = ir.from_proto(original)
    # Weights that exporters put in Constant nodes become initializers, so every pass (and ORT's
    # quantizer, which raises on them) sees one kind of weight.
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    # Old exporters list initializers as graph inputs too (overridable defaults); ONNX Runtime never needs
    # them fed, and only constants can be compressed.
    common.RemoveInitializersFromInputsPass()(model)
    registry = _pass_registry()
    passes = [registry[type(step)](step, context) for step in plan.steps]
    for step_pass in passes:  # refuse an impossible plan before any work
        step_pass.precheck(model)
    results = []
    for index, (step, step_pass) in enumerate(zip(plan.steps, passes, strict=True)):
        # Fractions only grow: 0-5% validation, 5-75% the steps, 75-100% measuring.
        progress(f"step {index + 1}/{len(passes)}: {step.kind}", 0.05 + 0.7 * index / len(passes))
        before = _parameters(model)
        start = time.perf_counter()
        try:
            model = step_pass(model).model
            common.RemoveUnusedNodesPass()(model)
        except CompressionError:
            raise
        except Exception as e:
            logger.exception("step %d (%s) failed", index + 1, step.kind)
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
    sample_shapes = {name: list(array.shape) for name, array in chosen.feeds[0].items()}
    return EvaluationData(source=source, samples=len(chosen.feeds), note=note, input_shapes=sample_shapes), chosen


def _measure(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    reference: Runner,
    candidate: Runner,
    plan: Plan,
    steps: list[StepResult],
    data: EvaluationData,
    dataset: Dataset,
) -> Report:
    if candidate.output_names != reference.output_names:
        raise PassFailedError(
            f"the compressed model's outputs {candidate.output_names} differ from the original's "
            f"{reference.output_names}"
        )
    ref_out = [reference.run(feed) for feed in dataset.feeds]
    new_out = [candidate.run(feed) for feed in dataset.feeds]
    names = reference.output_names
    acc = accuracy(names, dataset.labels, ref_out, new_out) if dataset.labels is not None else None
    options = plan.evaluation
    first = dataset.feeds[0]
    batch = next(iter(first.values())).shape[0] if first and next(iter(first.values())).ndim else 1
    lat_before, lat_after = measure_latency(
        reference, candidate, first, runs=options.latency_runs, warmup=options.warmup_runs, batch=batch
    )
    warnings = [w for s in steps for w in s.warnings]
    if data.source == "synthetic":
        warnings.append(data.note)
    slowdown = lat_after.p50_ms / lat_before.p50_ms if lat_before.p50_ms > 0 else 1.0
    if slowdown > 1.1:
        warnings.append(
            f"the compressed model is slower than the original on this host: p50 {lat_after.p50_ms:.3f} ms vs "
            f"{lat_before.p50_ms:.3f} ms ({slowdown:.2f}x); try other options (e.g. per_channel off, fewer op "
            "types quantized) or keep the original if latency matters"
        )
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
        latency_before=lat_before,
        latency_after=lat_after,
        agreement=Agreement(outputs=agreement(names, ref_out, new_out), accuracy=acc),
        warnings=warnings,
        total_seconds=0.0,
        cpu=cpu_note(),
    )


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
