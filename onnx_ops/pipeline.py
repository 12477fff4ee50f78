"""The one entry point: validate the model and data, run the plan's passes, check and measure the result."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
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
from onnx_ir.passes import common
from pydantic import BaseModel, ValidationError

from onnx_ops import job_files
from onnx_ops.agreement import accuracy
from onnx_ops.data import Dataset, InputSpec, input_specs, load_dataset, resolve_shapes
from onnx_ops.errors import CompressionError, InvalidModelError, PassFailedError, PlanError, ResourceLimitError
from onnx_ops.evaluate import Runner, memory_limit_text, model_stats, out_of_memory
from onnx_ops.large import check_model, save_model
from onnx_ops.measure import evaluation_inputs as _evaluation_inputs
from onnx_ops.measure import measure
from onnx_ops.passes._base import PassContext, PassLog
from onnx_ops.plan import (
    AutoStep,
    ClusterStep,
    DistillStep,
    Fp16Step,
    Int4Step,
    OptimizeStep,
    Plan,
    PruneStep,
    QuantizeStep,
    SvdStep,
)
from onnx_ops.plan_errors import explain
from onnx_ops.progress import Progress, Tracker
from onnx_ops.report import AutoResult, Report, StepResult
from onnx_ops.teacher import retarget_teacher
from onnx_ops.validate import Limits, clean_message, load_model, validate_model

__all__ = ["CompressionResult", "DataSource", "ModelSource", "compress", "parse_plan", "save_report"]

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto
DataSource = str | os.PathLike[str] | Mapping[str, np.ndarray]
# Shares of the whole job (see onnx_ops.progress): checking the inputs, the steps (or the search and the
# chosen plan's run), measuring both models.
_VALIDATE, _STEPS, _SEARCH, _MEASURE, _MEASURED = 0.05, 0.75, 0.70, 0.97, 0.98
# Models with at least this many weights free what a step dropped at once (see _release_memory); a full
# collection costs time that auto's search, building many small candidates, cannot spare.
_RELEASE_PARAMETERS = 1 << 24


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def _pass_registry() -> dict[type[BaseModel], Callable[[Any, PassContext], Any]]:
    """Plan step type -> pass class, an explicit table (imported on first use: quantize pulls in ORT's tools)."""
    from onnx_ops.passes.cluster import ClusterPass
    from onnx_ops.passes.distill import DistillPass
    from onnx_ops.passes.fp16 import Fp16ConvertPass
    from onnx_ops.passes.int4 import Int4QuantizePass
    from onnx_ops.passes.optimize import OptimizePass
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
        ClusterStep: ClusterPass,
        OptimizeStep: OptimizePass,
    }


@dataclasses.dataclass(frozen=True)
class CompressionResult:
    """The compressed model and the report measured on it."""

    model: onnx.ModelProto
    report: Report

    def save(
        self, path: str | os.PathLike[str], *, external_data: bool | None = None, threshold: int | None = None
    ) -> bool:
        """Write the model atomically (temp file, then rename), so no reader sees half a file.

        Args:
            path: Where to write the model.
            external_data: True: its weights go to a data file beside it, named after it (``<name>.data``).
                False: one self-contained file. None: external data when the model would pass `threshold`
                bytes (by default, and at most, protobuf's 2 GiB limit).
            threshold: See `external_data`.

        Returns:
            Whether the model was written with external data.
        """
        return save_model(self.model, path, external_data=external_data, threshold=threshold)


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
        before = model_stats(original)
        # From here the original lives in the job's folder (its weights mapped by ONNX Runtime, read back by the
        # passes); the proto is kept only when auto's search or distill (its teacher) needs it.
        source = _keep_on_disk(original, model, workdir / "original.onnx")
        threads = plan.evaluation.threads
        # A model ONNX Runtime cannot load is the problem, whatever the plan or the data: found before either is
        # judged. auto keeps this session for its search; other plans free it until the measurement.
        reference: Runner | None = Runner(source, threads=threads, what="model")
        if not isinstance(plan.steps[0], AutoStep):
            reference = None
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
        evaluation_data = _evaluation_inputs(plan, specs, shapes, evaluation_set, calib, limits)
        keep = isinstance(plan.steps[0], AutoStep) or any(isinstance(s, DistillStep) for s in plan.steps)
        if keep:
            job_files.restore(original, workdir)
        else:
            del original
        context = PassContext(
            workdir=workdir,
            calibration=calib.feeds if calib else None,
            input_shapes=shapes,
            teacher=original if keep else None,
        )
        auto: AutoResult | None = None
        if reference is not None:
            work = tracker.part(_VALIDATE, _STEPS)
            compressed, steps, auto = _run_auto(original, plan, context, evaluation_data[1], reference, work)
        else:
            compressed, steps = _run_plan(original if keep else source, plan, context, tracker.part(_VALIDATE, _STEPS))
        context = dataclasses.replace(context, teacher=None)
        if keep:
            del original
        measuring = tracker.part(_STEPS, _MEASURE, "measuring")
        measuring.stage("loading the compressed model")
        after = model_stats(compressed)
        compressed_file = job_files.spill(compressed, workdir / "compressed.onnx")
        _release_memory()
        if reference is None:
            reference = Runner(source, threads=threads, what="model")
        candidate = Runner(compressed_file, threads=threads, what="compressed model")
        runners = (reference, candidate)
        del reference, candidate
        report = measure((before, after), runners, plan, steps, evaluation_data, measuring, workdir)
        del runners  # both sessions go before the compressed model's weights come back
        _release_memory()
        job_files.restore(compressed, workdir)
    if auto is not None:
        warnings = report.warnings if auto.status == "met" else [auto.message, *report.warnings]
        report = report.model_copy(update={"auto": auto, "warnings": warnings})
    report = report.model_copy(update={"total_seconds": time.perf_counter() - started})
    tracker.stage("measured", _MEASURED)
    return CompressionResult(model=compressed, report=report)


def _release_memory() -> None:
    """Free what was dropped, now rather than later.

    The IR holds reference cycles (freed only by the collector), and glibc keeps freed heap pages in the process
    unless asked to give them back (they would count against the job's memory).
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _keep_on_disk(original: onnx.ModelProto, given: ModelSource, path: Path) -> Path:
    """Write the original to the job's folder with its weights in a data file; `original` keeps only its graph.

    A ModelProto the caller gave is left whole: a copy of it is written.
    """
    if original is given:
        copy = onnx.ModelProto()
        copy.CopyFrom(original)
        return job_files.spill(copy, path)
    return job_files.spill(original, path)


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
    source: onnx.ModelProto | Path, plan: Plan, context: PassContext, tracker: Tracker
) -> tuple[onnx.ModelProto, list[StepResult]]:
    """Run the plan's steps on the model (a proto, or a file written by job_files, read here and held by the IR)."""
    model = ir.from_proto(source if isinstance(source, onnx.ModelProto) else job_files.load(source))
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
        retarget_teacher(plan.steps, index, model, passes[index:])  # distill's teacher: after optimize, if first
        parts[index].stage("")
        before = _parameters(model)
        start = time.perf_counter()
        try:
            model = step_pass(model).model
            if before >= _RELEASE_PARAMETERS:
                _release_memory()
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
    big = _parameters(model) >= _RELEASE_PARAMETERS
    del model  # the IR's weights (and the original's it still shares) go before the checks
    if big:
        _release_memory()
    try:
        check_model(proto)  # through a file past 2 GiB
    except (onnx.checker.ValidationError, ValueError) as e:
        raise PassFailedError(f"the compressed model fails the ONNX checker: {clean_message(e)}") from e
    return proto, results


def _parameters(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)


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
