"""Every case of the hostile corpus against one running service.

For each case: the expected status and error code (or the job's failure code); no server path in any
answer; the server still answers /healthz; nothing outside the job's folder appeared or changed; and a
valid job still succeeds (right beside every job-time case, every few upload-time cases, and at the end).
"""

from __future__ import annotations

from typing import Any

import pytest

from corpus import Case, Fails, Refused, Request, Succeeds, cases, valid_request
from hostile_harness import (
    Service,
    check_no_server_path,
    check_nothing_outside_job_folders,
    hostile_service_fixture,  # noqa: F401 - the session fixture "hostile_service"
)
from service_harness import error_of, wait_for_job

CASES = cases()
VALID_JOB_EVERY = 5  # upload-time cases between two checks that a valid job still succeeds
JOB_WAIT_S = 60.0


def _send(client: Any, request: Request) -> Any:
    content: Any = iter(request.body) if isinstance(request.body, list) else request.body
    return client.request(request.method, request.path, content=content, headers=request.headers)


def _submit_valid(service: Service) -> str:
    response = _send(service.client, valid_request())
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _check_valid_job(service: Service, job_id: str) -> None:
    job, _ = wait_for_job(service.client, job_id, timeout=JOB_WAIT_S)
    assert job["state"] == "succeeded", f"a valid job after the case failed: {job['error']}"
    service.cases_since_valid_job = 0


def _check_job(service: Service, client: Any, case: Case, job_id: str) -> None:
    job, seen = wait_for_job(client, job_id, timeout=JOB_WAIT_S)
    for answer in seen:
        check_no_server_path(service, str(answer))
    expected = case.expected
    if isinstance(expected, Succeeds):
        assert job["state"] == "succeeded", job["error"]
        if expected.model_name is not None:
            assert job["model_name"] == expected.model_name
        assert "/" not in job["model_name"] and "\0" not in job["model_name"]
        report = client.get(f"/api/jobs/{job_id}/report")
        assert report.status_code == 200
        check_no_server_path(service, report.text)
        return
    assert isinstance(expected, Fails)
    assert job["state"] == "failed", f"the job {job['state']}, expected a failure with {expected.codes}"
    error = job["error"]
    assert error["code"] in expected.codes, error
    assert expected.words in error["message"], error
    assert error["message"].strip(), error


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []) for c in CASES],
    ids=[f"{c.kind}: {c.name}" for c in CASES],
)
def test_hostile_input(hostile_service: Service, case: Case) -> None:
    service = hostile_service
    client = service.protected if case.protected else service.deadline if case.runs_forever else service.client
    response = _send(client, case.build())
    check_no_server_path(service, response.text)
    expected = case.expected
    valid_id: str | None = None
    if isinstance(expected, Refused):
        assert response.status_code == expected.status, response.text[:500]
        if expected.code is not None:
            assert error_of(response)["code"] == expected.code, response.text[:500]
        service.cases_since_valid_job += 1
    else:
        assert response.status_code == 202, response.text[:500]
        if not case.protected:  # the protected twin runs no worker: its job stays queued
            valid_id = _submit_valid(service)  # runs beside the hostile job, on the second worker (or app)
            _check_job(service, client, case, str(response.json()["id"]))

    assert service.client.get("/healthz").status_code == 200
    assert service.protected.get("/healthz").status_code == 200
    assert service.deadline.get("/healthz").status_code == 200
    check_nothing_outside_job_folders(service)
    if valid_id is None and service.cases_since_valid_job >= VALID_JOB_EVERY:
        valid_id = _submit_valid(service)
    if valid_id is not None:
        _check_valid_job(service, valid_id)
        check_nothing_outside_job_folders(service)


def test_corpus_is_large_and_covers_every_kind() -> None:
    kinds = {c.kind for c in CASES}
    assert kinds == {"http", "model", "data"}
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"


def test_valid_job_succeeds_after_the_whole_corpus(hostile_service: Service) -> None:
    service = hostile_service
    _check_valid_job(service, _submit_valid(service))
    check_nothing_outside_job_folders(service)
    jobs = service.client.get("/api/jobs")
    assert jobs.status_code == 200
    check_no_server_path(service, jobs.text)
