"""The HTTP API: /api/jobs (create, list, status, report, model, delete) and /healthz."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, Field

from onnx_ops.errors import PlanError
from onnx_ops.plan import AutoStep, Plan
from service.admission import admit, client_of, linger
from service.bundles import ResultFile, result_file
from service.deps import QueueDep, SettingsDep, require_token
from service.errors import ApiError
from service.jobs import INPUT_FILES, Job, JobError, JobNotFoundError, JobState, JobStore
from service.queue import JobQueue
from service.results import stream_job_file
from service.settings import Settings
from service.uploads import receive_upload

__all__ = ["JobOut", "create_job", "router"]

router = APIRouter(prefix="/api", tags=["jobs"], dependencies=[Depends(require_token)])

_UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model", "plan"],
                    "properties": {
                        "model": {"type": "string", "format": "binary", "description": "self-contained .onnx"},
                        "plan": {"type": "string", "description": "the plan as JSON (see the Plan schema)"},
                        "calibration": {"type": "string", "format": "binary", "description": ".npz"},
                        "evaluation": {"type": "string", "format": "binary", "description": ".npz with labels"},
                    },
                }
            }
        },
    }
}


class ModelDownload(BaseModel):
    """What the model link of a succeeded job returns."""

    media_type: str = Field(description="application/octet-stream (one .onnx) or application/zip (a bundle)")
    filename: str
    bytes: int
    bundle: bool = Field(description="A .zip of the .onnx and its external data file (keep them side by side)")
    files: list[str] = Field(description="The files a bundle holds (empty for a single .onnx)")


class JobOut(BaseModel):
    """A job as the API shows it."""

    id: str
    state: JobState
    model_name: str
    inputs: list[str]
    stage: str | None
    progress: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: JobError | None
    plan: dict[str, Any]
    links: dict[str, str]
    model_download: ModelDownload | None = None

    @classmethod
    def of(cls, job: Job, store: JobStore) -> JobOut:
        """Combine the record with the job process's last progress report."""
        progress = store.progress(job.id) if job.state == JobState.running else {}
        done = job.state in (JobState.succeeded, JobState.failed)
        base = f"/api/jobs/{job.id}"
        links = {"self": base, "page": f"/jobs/{job.id}"}
        if job.state == JobState.succeeded:
            links |= {"report": f"{base}/report", "report_html": f"{base}/report.html", "model": f"{base}/model"}
        download = _download(job, store) if job.state == JobState.succeeded else None
        return cls(
            id=job.id,
            state=job.state,
            model_name=job.model_name,
            inputs=job.inputs,
            stage=str(progress.get("stage")) if progress else (job.state.value if done else None),
            progress=1.0 if done else float(progress.get("fraction", 0.0) or 0.0),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            error=job.error,
            plan=job.plan,
            links=links,
            model_download=download,
        )


def _download(job: Job, store: JobStore) -> ModelDownload | None:
    folder = store.path(job.id)
    result = result_file(folder)
    if result is None:
        return None
    try:
        size = (folder / result.name).stat().st_size
    except OSError:
        return None
    return ModelDownload(
        media_type=result.media_type,
        filename=_download_name(job, result),
        bytes=size,
        bundle=bool(result.files),
        files=list(result.files),
    )


def _download_name(job: Job, result: ResultFile) -> str:
    return f"{Path(job.model_name).stem or 'model'}.compressed{result.suffix}"


def _get(store: JobStore, job_id: str) -> Job:
    try:
        return store.get(job_id)
    except JobNotFoundError as e:
        raise ApiError(404, "job_not_found", "no job with this id") from e


def _result_response(
    store: JobStore, job_id: str, name: str, media_type: str, filename: str | None = None
) -> StreamingResponse:
    """A succeeded job's result, streamed from the file checked when it was opened (see stream_job_file)."""
    job = _get(store, job_id)
    if job.state != JobState.succeeded:
        detail = f"it {job.state.value}" if job.state == JobState.failed else f"it is {job.state.value}"
        raise ApiError(409, "job_not_finished", f"the job has no results: {detail}")
    return stream_job_file(store.path(job_id), name, media_type, filename)


async def create_job(request: Request, settings: Settings, queue: JobQueue) -> Job:
    """Stream an upload into a new job folder, check what can be checked without parsing the model, enqueue."""
    try:
        admit(request, settings, queue)
    except ApiError:
        await linger(request, settings)
        raise
    try:
        job = await _receive_job(request, settings, queue.store)
    finally:
        request.app.state.upload_slots.give_back(client_of(request))
    queue.enqueue(job.id)
    return job


async def _receive_job(request: Request, settings: Settings, store: JobStore) -> Job:
    job_id, folder = store.reserve()
    try:
        upload = await receive_upload(request.headers.get("content-type"), request.stream(), folder, settings)
        plan = _plan(upload.fields.get("plan"), set(upload.files))
        _check_fits_the_deadline(plan, settings)
        if "model" not in upload.files:
            raise ApiError(422, "invalid_request", "the form has no 'model' file")
        if (folder / INPUT_FILES["model"]).stat().st_size == 0:
            raise ApiError(422, "invalid_model", "the model file is empty (0 bytes)")
        return store.create(job_id, plan.model_dump(mode="json"), upload.files["model"], sorted(upload.files))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _check_fits_the_deadline(plan: Plan, settings: Settings) -> None:
    """An auto search longer than a job may run would only end in a timeout: say so before it is queued."""
    for step in plan.steps:
        if isinstance(step, AutoStep) and step.time_budget_s >= settings.job_timeout_s:
            raise ApiError(
                422,
                "invalid_plan",
                f"steps.auto.time_budget_s is {step.time_budget_s} s but a job may run {settings.job_timeout_s} s "
                "on this server (COMPRESS_JOB_TIMEOUT_S), and the final measurement comes after the search: "
                "ask for less",
            )


def _plan(text: str | None, files: set[str]) -> Plan:
    from onnx_ops.pipeline import parse_plan

    if not text:
        raise ApiError(422, "invalid_plan", "the form has no 'plan' field (the plan as JSON)")
    try:
        plan = parse_plan(text)
    except PlanError as e:
        raise ApiError(422, "invalid_plan", e.message) from e
    if plan.needs_calibration and "calibration" not in files:
        message = f"{plan.calibration_user} needs calibration data: upload a 'calibration' .npz"
        raise ApiError(422, "invalid_plan", message)
    return plan


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobOut,
    openapi_extra=_UPLOAD_SCHEMA,
    responses={
        408: {"description": "upload too slow"},
        413: {"description": "upload too large"},
        429: {"description": "too many uploads from this client; see Retry-After"},
        503: {"description": "busy; see Retry-After"},
    },
)
async def post_job(request: Request, settings: SettingsDep, queue: QueueDep) -> JobOut:
    """Upload a model (multipart: model, plan, optional calibration and evaluation) and queue a job."""
    job = await create_job(request, settings, queue)
    return JobOut.of(job, queue.store)


@router.get("/jobs", response_model=list[JobOut])
def list_jobs(queue: QueueDep) -> list[JobOut]:
    """All jobs, newest first."""
    return [JobOut.of(job, queue.store) for job in queue.store.list()]


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, queue: QueueDep) -> JobOut:
    """A job's state, current step and progress."""
    return JobOut.of(_get(queue.store, job_id), queue.store)


@router.get("/jobs/{job_id}/report", response_class=StreamingResponse)
def get_report(job_id: str, queue: QueueDep) -> StreamingResponse:
    """The report as JSON (schema version in the body)."""
    return _result_response(queue.store, job_id, "report.json", "application/json")


@router.get("/jobs/{job_id}/report.html", response_class=HTMLResponse)
def get_report_html(job_id: str, queue: QueueDep) -> StreamingResponse:
    """The report as a self-contained HTML page with charts."""
    return _result_response(queue.store, job_id, "report.html", "text/html; charset=utf-8")


@router.get("/jobs/{job_id}/model", response_class=StreamingResponse)
def get_model(job_id: str, queue: QueueDep) -> StreamingResponse:
    """The compressed model, named after the upload: one .onnx, or a .zip of the .onnx and its external data."""
    job = _get(queue.store, job_id)
    result = result_file(queue.store.path(job_id)) if job.state == JobState.succeeded else None
    if result is None:  # not finished (409), or its files are gone (404)
        return _result_response(queue.store, job_id, "output.onnx", "application/octet-stream")
    return _result_response(queue.store, job_id, result.name, result.media_type, _download_name(job, result))


@router.delete("/jobs/{job_id}", status_code=204)
def delete_job(job_id: str, queue: QueueDep) -> Response:
    """Delete a job and its files (a running job must finish first)."""
    job = _get(queue.store, job_id)
    if job.state == JobState.running:
        raise ApiError(409, "job_running", "the job is running; delete it when it has finished")
    queue.store.delete(job_id)
    return Response(status_code=204)


health = APIRouter(tags=["health"])


@health.get("/healthz")
def healthz(queue: QueueDep) -> dict[str, object]:
    """Liveness: answers without a token."""
    return {"status": "ok", "queued": queue.pending(), "time": time.time()}
