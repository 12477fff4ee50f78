"""Running a plan's steps on a model: the passes in order, each failure named, the result checked.

The model comes in as the job's weightless file with its weights mapped (onnx_ops.job_files.load_ir) or as a
ModelProto (auto's search, distill's teacher); it goes out as files in the job's folder, checked there by path
(`to_file`), or as a ModelProto (`to_proto`, for auto's candidates). Between steps what a step dropped is freed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes import common
from pydantic import BaseModel

from onnx_ops import job_files
from onnx_ops.errors import CompressionError, PassFailedError, ResourceLimitError
from onnx_ops.evaluate import memory_limit_text, out_of_memory, procfs_message
from onnx_ops.large import check_model
from onnx_ops.memory import release_memory
from onnx_ops.passes._base import PassContext, PassLog
from onnx_ops.plan import (
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
from onnx_ops.progress import Tracker
from onnx_ops.report import StepResult
from onnx_ops.teacher import retarget_teacher
from onnx_ops.validate import clean_message

__all__ = ["RELEASE_PARAMETERS", "parameters", "run_steps", "to_file", "to_proto"]

logger = logging.getLogger(__name__)

# Models with at least this many weights free what a step dropped at once (see release_memory); a full
# collection costs time that auto's search, building many small candidates, cannot spare.
RELEASE_PARAMETERS = 1 << 24


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


def run_steps(
    source: onnx.ModelProto | Path, plan: Plan, context: PassContext, tracker: Tracker
) -> tuple[ir.Model, list[StepResult]]:
    """Run the plan's steps on the model: a proto (left unchanged), or a job file whose weights are mapped."""
    model = ir.from_proto(source) if isinstance(source, onnx.ModelProto) else job_files.load_ir(source)
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
    # The first step sees the job file's weights as they are on disk (mapped, unchanged): it may refer to them.
    first = None if isinstance(source, onnx.ModelProto) else source
    passes = [
        registry[type(step)](step, dataclasses.replace(context, progress=part, source=first if i == 0 else None))
        for i, (step, part) in enumerate(zip(plan.steps, parts, strict=True))
    ]
    for step_pass in passes:  # refuse an impossible plan before any work
        step_pass.precheck(model)
    results = []
    for index, (step, step_pass) in enumerate(zip(plan.steps, passes, strict=True)):
        retarget_teacher(plan.steps, index, model, passes[index:])  # distill's teacher: after optimize, if first
        parts[index].stage("")
        before = parameters(model)
        start = time.perf_counter()
        try:
            model = step_pass(model).model
            if before >= RELEASE_PARAMETERS:
                release_memory()
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
            reason = procfs_message("model") if "requires procfs" in str(e) else None
            raise PassFailedError(f"step {index + 1} ({step.kind}) failed: {reason or clean_message(e)}") from e
        log: PassLog = step_pass.log
        results.append(
            StepResult(
                index=index + 1,
                kind=step.kind,
                config=step.model_dump(mode="json"),
                seconds=time.perf_counter() - start,
                parameters_before=before,
                parameters_after=parameters(model),
                layers=log.layers,
                skipped=log.skipped,
                warnings=log.warnings,
                summary=log.summary,
            )
        )
    common.RemoveUnusedOpsetsPass()(model)  # e.g. paddle2onnx's 'Paddle' import, which no node uses
    return model, results


def to_proto(
    source: onnx.ModelProto | Path, plan: Plan, context: PassContext, tracker: Tracker
) -> tuple[onnx.ModelProto, list[StepResult]]:
    """`run_steps`, the result as a ModelProto checked by the ONNX checker (through files past 2 GiB)."""
    model, results = run_steps(source, plan, context, tracker)
    proto = ir.to_proto(model)
    big = parameters(model) >= RELEASE_PARAMETERS
    del model  # the IR's weights (and the original's it still shares) go before the checks
    if big:
        release_memory()
    _checked(proto)
    return proto, results


def to_file(
    source: onnx.ModelProto | Path, plan: Plan, context: PassContext, tracker: Tracker, path: Path
) -> tuple[Path, list[StepResult]]:
    """`run_steps`, the result written to `path` with its weights in ``<name>.data`` (a tensor at a time).

    The checker then reads the weightless file by path: the weights are never serialized in one piece.
    """
    model, results = run_steps(source, plan, context, tracker)
    ir.save(
        model,
        path,
        external_data=f"{path.name}.data",
        size_threshold_bytes=job_files.THRESHOLD - 1,
        alignment=1 << 16,  # ONNX Runtime maps tensors at 64 KiB offsets rather than copy them
    )
    del model  # with the arrays mapped from the original's data file
    release_memory()
    _checked(str(path))
    return path, results


def _checked(model: onnx.ModelProto | str) -> None:
    try:
        check_model(model) if isinstance(model, onnx.ModelProto) else onnx.checker.check_model(model, full_check=False)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise PassFailedError(f"the compressed model fails the ONNX checker: {clean_message(e)}") from e


def parameters(model: ir.Model) -> int:
    """Elements in the model's initializers."""
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)
