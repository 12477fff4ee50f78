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
from pydantic import ValidationError

from onnx_ops import decoded, job_files, job_model
from onnx_ops.agreement import accuracy
from onnx_ops.data import Dataset, InputSpec, input_specs, load_dataset, resolve_shapes
from onnx_ops.errors import InvalidModelError, PlanError
from onnx_ops.evaluate import Runner
from onnx_ops.large import save_model
from onnx_ops.measure import evaluation_inputs as _evaluation_inputs
from onnx_ops.measure import measure, result_stats
from onnx_ops.memory import release_memory
from onnx_ops.passes._base import PassContext
from onnx_ops.plan import AutoStep, DistillStep, Plan
from onnx_ops.plan_errors import explain
from onnx_ops.progress import Progress, Tracker
from onnx_ops.report import AutoResult, Report, StepResult
from onnx_ops.run_plan import to_file, to_proto
from onnx_ops.validate import Limits

__all__ = ["CompressionResult", "DataSource", "ModelSource", "compress", "parse_plan", "save_report"]

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto
DataSource = str | os.PathLike[str] | Mapping[str, np.ndarray]
# Shares of the whole job (see onnx_ops.progress): checking the inputs, the steps (or the search and the
# chosen plan's run), measuring both models.
_VALIDATE, _STEPS, _SEARCH, _MEASURE, _MEASURED = 0.05, 0.75, 0.70, 0.97, 0.98


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
    validated: Callable[[], object] | None = None,
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
        validated: Called once the model is validated into the job's own copy: from then on the model given
            (a path: its file and data files) is not read again, unless `limits.share_external_data`.

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
        # From here the original lives in the job's folder (its weights mapped by ONNX Runtime and the passes),
        # never held in memory unless auto's search or distill (its teacher) needs it.
        job = _prepare(model, workdir, limits)
        if validated is not None:
            validated()
        threads = plan.evaluation.threads
        # A model ONNX Runtime cannot load is the problem, whatever the plan or the data: found before either is
        # judged. auto keeps this session for its search; other plans free it until the measurement.
        reference: Runner | None = Runner(job.path, threads=threads, what="model")
        if not isinstance(plan.steps[0], AutoStep):
            reference = None
        specs = input_specs(job.graph)
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
        original = job_files.load(job.path) if keep else None
        context = PassContext(
            workdir=workdir, calibration=calib.feeds if calib else None, input_shapes=shapes, teacher=original
        )
        compressed_file = workdir / "compressed.onnx"
        auto: AutoResult | None = None
        if reference is not None:
            assert original is not None
            work = tracker.part(_VALIDATE, _STEPS)
            found, steps, auto = _run_auto(original, plan, context, evaluation_data[1], reference, work)
            job_files.spill(found, compressed_file)
            del found
        else:
            steps = to_file(
                job.path if original is None else original,
                plan,
                context,
                tracker.part(_VALIDATE, _STEPS),
                compressed_file,
            )[1]
        del context, original
        measuring = tracker.part(_STEPS, _MEASURE, "measuring")
        measuring.stage("loading the compressed model")
        after = result_stats(compressed_file)  # sizes as `save` writes it (past 2 GiB: from the files as they are)
        release_memory()
        measured = decoded.session_file(compressed_file, steps)  # before the original's session: see decoded
        if reference is None:
            reference = Runner(job.path, threads=threads, what="model")
        candidate = Runner(measured, threads=threads, what="compressed model")
        runners = (reference, candidate)
        del reference, candidate
        report = measure((job.stats, after), runners, plan, steps, evaluation_data, measuring, workdir)
        del runners  # both sessions go before the compressed model's weights come back
        release_memory()
        compressed = job_files.load(compressed_file)
    if auto is not None:
        warnings = report.warnings if auto.status == "met" else [auto.message, *report.warnings]
        report = report.model_copy(update={"auto": auto, "warnings": warnings})
    report = report.model_copy(update={"total_seconds": time.perf_counter() - started})
    tracker.stage("measured", _MEASURED)
    return CompressionResult(model=compressed, report=report)


def _prepare(model: ModelSource, workdir: Path, limits: Limits) -> job_model.JobModel:
    """Validate the model into the job's folder (see onnx_ops.job_model)."""
    if isinstance(model, onnx.ModelProto):
        return job_model.from_proto(model, workdir, limits)
    if isinstance(model, bytes):
        # In a folder of its own: nothing an uploaded model names can resolve against the job's other files
        # or the caller's working directory.
        path = workdir / "input" / "input.onnx"
        path.parent.mkdir()
        path.write_bytes(model)
        return job_model.from_file(path, workdir, limits)
    if not Path(model).is_file():
        raise InvalidModelError("the model file does not exist")
    return job_model.from_file(Path(model), workdir, limits)


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
        return to_proto(original, candidate, context, searching.here())[0]

    outcome = search(SearchInputs(original, plan, context, dataset, reference, build, searching.stage))
    if outcome.plan is None:
        return original, [], outcome.result
    compressed, steps = to_proto(
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


def _dataset(source: DataSource | None, specs: list[InputSpec], role: str, limits: Limits) -> Dataset | None:
    if source is None:
        return None
    if not isinstance(source, Mapping) and not Path(source).is_file():
        raise PlanError(f"the {role} file does not exist")
    return load_dataset(source, specs, role=role, max_bytes=limits.max_data_bytes)


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
