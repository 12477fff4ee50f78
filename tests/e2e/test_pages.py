"""The job page's progress while a job runs, and the API docs page, in the real browser."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from service.jobs import JobError, JobState, JobStore
from service.settings import Settings

import models

pytest.importorskip("playwright", reason="pip install pytest-playwright")

from playwright.sync_api import Page, expect

if TYPE_CHECKING:
    from conftest import Watch


def _report_progress(store: JobStore, job_id: str, stage: str, fraction: float) -> None:
    """Write progress.json as a job process does (atomically: the page may read it at any moment)."""
    path = store.path(job_id) / "progress.json"
    part = path.with_suffix(".part")
    part.write_text(json.dumps({"stage": stage, "fraction": fraction}))
    os.replace(part, path)


def test_job_page_follows_the_reported_progress_with_a_bar_and_the_time_left(
    page: Page, serve: Callable[..., str], tmp_path: Path, artifacts: Path, watch: Watch
) -> None:
    # No worker: this test plays the job process's part, so each state is reached when the test says so.
    data_dir = tmp_path / "data"
    url = serve(embedded_worker=False, data_dir=data_dir)
    watch.origin = url
    store = JobStore(Settings(data_dir=data_dir).jobs_dir)
    page.goto(f"{url}/")
    page.locator("#model").set_input_files(
        {"name": "mlp.onnx", "mimeType": "application/octet-stream", "buffer": models.mlp().SerializeToString()}
    )
    page.get_by_role("button", name="Compress").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#stage")).to_have_text("waiting for a worker")
    expect(page.locator("#percent")).to_have_text("0%")

    store.update(job_id, state=JobState.running, started_at=time.time())
    # A counted stage while the job's fraction stands still: the time left is that stage's.
    _report_progress(store, job_id, "step 1/1: quantize: calibration 1/40", 0.1)
    expect(page.locator("#stage")).to_have_text("step 1/1: quantize: calibration 1/40")
    _report_progress(store, job_id, "step 1/1: quantize: calibration 20/40", 0.1)
    expect(page.locator("#stage")).to_have_text("step 1/1: quantize: calibration 20/40")
    expect(page.locator("#eta")).to_contain_text("left in this stage")

    _report_progress(store, job_id, "step 1/1: quantize", 0.2)
    expect(page.locator("#job-state")).to_have_text("running")
    expect(page.locator("#stage")).to_have_text("step 1/1: quantize")
    expect(page.locator("#percent")).to_have_text("20%")
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "20")

    _report_progress(store, job_id, "evaluate", 0.6)
    expect(page.locator("#stage")).to_have_text("measuring both models (latency and accuracy)")
    expect(page.locator("#percent")).to_have_text("60%")
    # Once the reports span a few seconds the page estimates the time left from how fast the fraction grows.
    expect(page.locator("#eta")).to_contain_text(re.compile(r"left$"))
    fill = page.locator("#bar-fill")
    page.wait_for_function(
        "el => Math.abs(el.getBoundingClientRect().width / el.parentElement.clientWidth - 0.6) < 0.01",
        arg=fill.element_handle(),
    )
    page.screenshot(path=artifacts / "job-running.png", full_page=True)

    # A smaller fraction (a new stage counting from its own start) never moves the bar back.
    _report_progress(store, job_id, "writing results", 0.5)
    expect(page.locator("#stage")).to_have_text("writing the results")
    expect(page.locator("#percent")).to_have_text("60%")

    # When the job ends the page shows how.
    store.finish(job_id, JobError(code="timeout", message="the job ran past its 1800 s deadline"))
    expect(page.locator("#job-error")).to_contain_text("the job ran past its 1800 s deadline")
    expect(page.locator("#job-error")).to_contain_text("timeout")
    page.goto(f"{url}/")
    expect(page.locator(f'tr[data-job-id="{job_id}"] td.outcome')).to_have_text(
        "timeout: the job ran past its 1800 s deadline"
    )
    assert watch.problems == []


def test_docs_list_the_operations_without_leaving_the_server(
    page: Page, serve: Callable[..., str], artifacts: Path, watch: Watch
) -> None:
    url = serve()
    watch.origin = url
    page.goto(f"{url}/docs")
    for method, path in (
        ("post", "/api/jobs"),
        ("get", "/api/jobs"),
        ("get", "/api/jobs/{job_id}"),
        ("get", "/api/jobs/{job_id}/report.html"),
        ("get", "/api/jobs/{job_id}/model"),
        ("delete", "/api/jobs/{job_id}"),
        ("get", "/healthz"),
    ):
        expect(page.locator(f'.opblock-{method} .opblock-summary-path[data-path="{path}"]')).to_be_visible()
    expect(page.get_by_text("Unable to render this definition")).to_have_count(0)
    # An operation opens to show its request body: the upload's fields from the schema.
    page.locator('.opblock-post .opblock-summary-path[data-path="/api/jobs"]').click()
    expect(page.locator(".opblock-post .opblock-body")).to_contain_text("calibration")
    page.screenshot(path=artifacts / "docs-page.png", full_page=True)
    assert page.request.get(f"{url}/favicon.ico").status == 200
    assert watch.problems == []
