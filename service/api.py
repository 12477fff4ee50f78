"""The HTTP API: /api/jobs (create, list, status, report, model, delete) and /healthz."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from onnx_ops.errors import PlanError
from onnx_ops.plan import AutoStep, Plan
from service.deps import QueueDep, SettingsDep, require_token
from service.errors import ApiError
from service.job_files import JobFileError, open_job_file
from service.jobs import INPUT_FILES, Job, JobError, JobNotFoundError, JobState, JobStore
from service.queue import JobQueue
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

    @classmethod
    def of(cls, job: Job, store: JobStore) -> JobOut:
        """Combine the record with the job process's last progress report."""
        progress = store.progress(job.id) if job.state == JobState.running else {}
        done = job.state in (JobState.succeeded, JobState.failed)
        base = f"/api/jobs/{job.id}"
        links = {"self": base, "page": f"/jobs/{job.id}"}
        if job.state == JobState.succeeded:
            links |= {"report": f"{base}/report", "report_html": f"{base}/report.html", "model": f"{base}/model"}
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
        )


def _get(store: JobStore, job_id: str) -> Job:
    try:
        return store.get(job_id)
    except JobNotFoundError as e:
        raise ApiError(404, "job_not_found", "no job with this id") from e


def _open_result(store: JobStore, job_id: str, name: str) -> tuple[BinaryIO, int]:
    """A finished job's result file, opened safely (no links, a regular file of the job folder), and its size."""
    job = _get(store, job_id)
    if job.state != JobState.succeeded:
        detail = f"it {job.state.value}" if job.state == JobState.failed else f"it is {job.state.value}"
        raise ApiError(409, "job_not_finished", f"the job has no results: {detail}")
    try:
        f = open_job_file(store.path(job_id), name)
    except JobFileError as e:
        raise ApiError(404, "not_found", "the result is gone (deleted or expired) or is not a plain file") from e
    return f, os.fstat(f.fileno()).st_size


def _stream(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _result_response(
    store: JobStore, job_id: str, name: str, media_type: str, filename: str | None = None
) -> StreamingResponse:
    """Stream a result from the file opened and checked once: never read whole, never reopened by path."""
    f, size = _open_result(store, job_id, name)
    headers = {"Content-Length": str(size)}
    if filename is not None:  # as starlette's FileResponse says it
        quoted = quote(filename)
        headers["Content-Disposition"] = (
            f"attachment; filename*=utf-8''{quoted}" if quoted != filename else f'attachment; filename="{filename}"'
        )
    return StreamingResponse(_stream(f), media_type=media_type, headers=headers)


_CHUNK = 1 << 20


async def create_job(request: Request, settings: Settings, queue: JobQueue) -> Job:
    """Stream an upload into a new job folder, check what can be checked without parsing the model, enqueue."""
    try:
        _admit(request, settings, queue)
    except ApiError:
        await _linger(request, settings)
        raise
    store = queue.store
    job_id, folder = store.reserve()
    request.app.state.uploads_in_flight += 1
    try:
        caps = {
            "model": settings.max_model_mb << 20,
            "calibration": settings.max_data_mb << 20,
            "evaluation": settings.max_data_mb << 20,
        }
        upload = await receive_upload(
            request.headers.get("content-type"), request.stream(), folder, caps, settings.upload_timeout_s
        )
        plan = _plan(upload.fields.get("plan"), set(upload.files))
        _check_fits_the_deadline(plan, settings)
        if "model" not in upload.files:
            raise ApiError(422, "invalid_request", "the form has no 'model' file")
        if (folder / INPUT_FILES["model"]).stat().st_size == 0:
            raise ApiError(422, "invalid_model", "the model file is empty (0 bytes)")
        job = store.create(job_id, plan.model_dump(mode="json"), upload.files["model"], sorted(upload.files))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        request.app.state.uploads_in_flight -= 1
    queue.enqueue(job_id)
    return job


# A refused upload's body is read and thrown away for this long at most (nginx's "lingering close").
LINGER_S = 5.0
LINGER_MAX = 256  # refused uploads drained at the same time; each costs a coroutine and loopback/NIC bandwidth


async def _linger(request: Request, settings: Settings) -> None:
    """Read and discard a refused upload's body, so that a client still sending it gets to read the refusal.

    Closing a connection with unread data makes the kernel send a reset, and a client still writing its body
    (one that did not send `Expect: 100-continue`) then sees a broken connection instead of the 503. A client
    that sent `Expect: 100-continue` has sent no body (reading it would ask for it), so nothing is read then.
    At most LINGER_S seconds, as many bytes as one upload may have, and a bounded number of refused uploads
    at a time are drained; past any of these the connection is simply closed.
    """
    state = request.app.state
    if "100-continue" in request.headers.get("expect", "").lower() or state.lingering >= LINGER_MAX:
        return
    budget = (settings.max_model_mb + 2 * settings.max_data_mb + 1) << 20
    state.lingering += 1
    try:
        async with asyncio.timeout(LINGER_S):
            async for chunk in request.stream():
                budget -= len(chunk)
                if budget < 0:
                    break
    except (TimeoutError, ClientDisconnect):
        pass
    finally:
        state.lingering -= 1


def _admit(request: Request, settings: Settings, queue: JobQueue) -> None:
    retry = {"Retry-After": "5"}
    if request.app.state.uploads_in_flight >= settings.max_uploads_in_flight:
        raise ApiError(503, "busy", "too many uploads in progress; retry shortly", retry)
    if queue.pending() >= settings.max_queued_jobs:
        raise ApiError(503, "busy", "the job queue is full; retry later", {"Retry-After": "30"})
    free = shutil.disk_usage(settings.data_dir).free
    if free < settings.min_free_disk_mb << 20:
        raise ApiError(507, "insufficient_storage", "the server is low on disk space; retry later")


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
        what = "distill" if any(s.kind == "distill" for s in plan.steps) else "static quantization"
        raise ApiError(422, "invalid_plan", f"{what} needs calibration data: upload a 'calibration' .npz")
    return plan


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobOut,
    openapi_extra=_UPLOAD_SCHEMA,
    responses={413: {"description": "upload too large"}, 503: {"description": "busy; see Retry-After"}},
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
    """The compressed model, named after the upload."""
    stem = Path(_get(queue.store, job_id).model_name).stem or "model"
    return _result_response(
        queue.store, job_id, "output.onnx", "application/octet-stream", filename=f"{stem}.compressed.onnx"
    )


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
