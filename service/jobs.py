"""Job records: one folder per job under DATA_DIR/jobs/<id>/, state in job.json written atomically.

Folder layout (all names chosen by the server, never by an upload)::

    job.json          the record (state, plan, error, timestamps); changed only under the folder's lock
    input.onnx        the uploaded model (deleted once the job has its own copy; a bundle's archive once unpacked)
    model/            a bundle's files, unpacked by the job's process (deleted once the job has its own copy)
    calibration.npz   optional
    evaluation.npz    optional
    progress.json     written by the job's process: {"stage": ..., "fraction": ...}
    output.onnx, report.json, report.html    the results, each published with os.replace
    error.json        written by the job's process when it fails with a known error
    tmp/              the job process's own temporary directory

The folder is 0700 and every file in it 0600. The server reads job files only through service.job_files
(never through a link, records with a size cap): the job's process may have replaced any of them.
Whatever an upload puts in a record (its file name, an error quoting the model) is cut to a fixed length.
"""

from __future__ import annotations

import builtins
import contextlib
import enum
import errno
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field

from service.job_files import FILE_MODE, FOLDER_MODE, JobFileError, atomic_write, make_private_folder, read_capped
from service.job_upload import UPLOAD

__all__ = [
    "INPUT_FILES",
    "MAX_MESSAGE_CHARS",
    "MAX_RECORD_BYTES",
    "Job",
    "JobError",
    "JobNotFoundError",
    "JobState",
    "JobStore",
    "atomic_write",
    "bounded_text",
]

JOB_ID = re.compile(r"[0-9a-f]{32}")  # always fullmatch: "$" would also accept a trailing newline
INPUT_FILES = {"model": UPLOAD, "calibration": "calibration.npz", "evaluation": "evaluation.npz"}
# A record holds the plan (its form field is capped at 64 KB), short fields and a bounded error: a job.json
# larger than this was not written by the server and is not read.
MAX_RECORD_BYTES = 256 << 10
_MAX_PROGRESS_BYTES = 4096
MAX_MESSAGE_CHARS = 1000  # an error message; it may quote the model's names, domains or data keys
_MAX_CODE_CHARS, _MAX_NAME_CHARS, _MAX_STAGE_CHARS = 64, 200, 200


def bounded_text(value: object, limit: int) -> str:
    """str(value) cut to `limit` characters (the last one then "…"): what an upload put in a record stays short."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded(limit: int) -> BeforeValidator:
    return BeforeValidator(lambda value: bounded_text(value, limit))


class JobNotFoundError(KeyError):
    """No job has this id (or the id is malformed)."""


class JobState(enum.StrEnum):
    """Where a job is in its life."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class JobError(BaseModel):
    """Why a job failed: a stable code and a message without server paths."""

    code: Annotated[str, _bounded(_MAX_CODE_CHARS)]
    message: Annotated[str, _bounded(MAX_MESSAGE_CHARS)]


class Job(BaseModel):
    """The record of one job."""

    id: str
    state: JobState = JobState.queued
    plan: dict[str, Any]
    model_name: Annotated[str, _bounded(_MAX_NAME_CHARS)] = Field(
        description="The uploaded file's name, for display and the download name only."
    )
    inputs: list[str] = Field(description="Which of model, calibration, evaluation were uploaded.")
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    attempts: int = 0
    worker: str | None = None
    error: JobError | None = None


class JobStore:
    """Job folders under one directory; safe to share between processes on one host (flock)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)

    def path(self, job_id: str) -> Path:
        """The folder of a job; the id is checked against a strict pattern before any path is built."""
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise JobNotFoundError(job_id)
        return self.root / job_id

    def reserve(self) -> tuple[str, Path]:
        """A new job id (128 random bits) and its empty folder, not yet visible as a job."""
        job_id = secrets.token_hex(16)
        folder = self.path(job_id)
        make_private_folder(folder)
        return job_id, folder

    def create(self, job_id: str, plan: dict[str, Any], model_name: str, inputs: list[str]) -> Job:
        """Write the record of a reserved job; from now on it exists."""
        now = time.time()
        job = Job(id=job_id, plan=plan, model_name=model_name, inputs=inputs, created_at=now, updated_at=now)
        self._write(job)
        return job

    def get(self, job_id: str) -> Job:
        """Read a job record (capped, never through a link: a job's process could have replaced it).

        Raises JobNotFoundError when it is missing or unreadable, ValueError when it is not a record.
        """
        try:
            data = read_capped(self.path(job_id), "job.json", MAX_RECORD_BYTES)
        except JobFileError as e:
            raise JobNotFoundError(job_id) from e
        return Job.model_validate_json(data)

    def list(self) -> list[Job]:
        """All jobs, newest first (folders without a record, e.g. uploads in progress, are left out)."""
        jobs = []
        for folder in self.root.iterdir():
            with contextlib.suppress(JobNotFoundError, ValueError):
                jobs.append(self.get(folder.name))
        return sorted(jobs, key=lambda j: j.created_at, reverse=True)

    def update(self, job_id: str, **changes: Any) -> Job:
        """Change fields of a record under the folder's lock."""
        with self.locked(job_id):
            job = self.get(job_id).model_copy(update={**changes, "updated_at": time.time()})
            self._write(job)
            return job

    def claim(self, job_id: str, worker: str) -> Job | None:
        """Move a queued job to running for this worker; None if someone else has it or it is gone."""
        try:
            with self.locked(job_id):
                job = self.get(job_id)
                if job.state != JobState.queued:
                    return None
                now = time.time()
                job = job.model_copy(
                    update={
                        "state": JobState.running,
                        "worker": worker,
                        "started_at": now,
                        "heartbeat_at": now,
                        "updated_at": now,
                        "attempts": job.attempts + 1,
                    }
                )
                self._write(job)
                return job
        except JobNotFoundError:
            return None

    def finish(self, job_id: str, error: JobError | None) -> Job:
        """End a running job as succeeded (no error) or failed."""
        state = JobState.failed if error else JobState.succeeded
        return self.update(job_id, state=state, error=error, finished_at=time.time())

    def delete(self, job_id: str) -> None:
        """Remove a job and all its files."""
        folder = self.path(job_id)
        if not folder.exists():
            raise JobNotFoundError(job_id)
        shutil.rmtree(folder, ignore_errors=True)

    def progress(self, job_id: str) -> dict[str, Any]:
        """What the job's process last reported: {"stage": str, "fraction": float}, or {} before it starts."""
        try:
            data = json.loads(read_capped(self.path(job_id), "progress.json", _MAX_PROGRESS_BYTES))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or "stage" not in data:
            return {}
        fraction = data.get("fraction")
        if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not math.isfinite(fraction):
            fraction = 0.0
        return {"stage": bounded_text(data["stage"], _MAX_STAGE_CHARS), "fraction": float(fraction)}

    def recover(self, stale_after: float, is_dead: Callable[[str], bool] = lambda worker: False) -> builtins.list[str]:
        """After a restart: fail running jobs whose worker is gone; return the ids still queued.

        A worker is gone when `is_dead(job.worker)` says so (a process of this host that no longer exists)
        or when it has not refreshed the job's heartbeat for `stale_after` seconds (a worker elsewhere).
        """
        queued = []
        for job in self.list():
            if job.state == JobState.queued:
                queued.append(job.id)
            elif job.state == JobState.running and self._orphaned(job, stale_after, is_dead):
                with self.locked(job.id):
                    current = self.get(job.id)
                    if current.state == JobState.running and self._orphaned(current, stale_after, is_dead):
                        now = time.time()
                        error = JobError(code="interrupted", message="the worker stopped while the job was running")
                        update = {"state": JobState.failed, "error": error, "finished_at": now, "updated_at": now}
                        self._write(current.model_copy(update=update))
        return queued

    @staticmethod
    def _orphaned(job: Job, stale_after: float, is_dead: Callable[[str], bool]) -> bool:
        beat = job.heartbeat_at or job.updated_at
        return time.time() - beat > stale_after or (job.worker is not None and is_dead(job.worker))

    def purge(self, older_than_s: float) -> int:
        """Delete finished jobs older than this, and orphan folders (uploads that never became jobs)."""
        removed = 0
        now = time.time()
        for folder in list(self.root.iterdir()):
            if not JOB_ID.fullmatch(folder.name):
                continue
            try:
                job = self.get(folder.name)
            except (JobNotFoundError, ValueError):
                if now - folder.stat().st_mtime > older_than_s:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
                continue
            if job.state in (JobState.succeeded, JobState.failed) and now - job.updated_at > older_than_s:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    @contextlib.contextmanager
    def locked(self, job_id: str) -> Iterator[None]:
        """Hold the job folder's lock (across processes)."""
        folder = self.path(job_id)
        lock, flags = folder / ".lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            # O_NOFOLLOW: a link planted here by the job's process must not make the server create or lock
            # a file elsewhere; the link is removed and the lock file made again.
            try:
                fd = os.open(lock, flags, FILE_MODE)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                lock.unlink()
                fd = os.open(lock, flags, FILE_MODE)
        except FileNotFoundError as e:
            raise JobNotFoundError(job_id) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _record(self, job_id: str) -> Path:
        return self.path(job_id) / "job.json"

    def _write(self, job: Job) -> None:
        atomic_write(self._record(job.id), job.model_dump_json(indent=1).encode())
