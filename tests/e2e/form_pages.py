"""What the form's browser tests share: the files they upload, and submitting the form and waiting for the job."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from playwright.sync_api import Locator, Page, expect

import models

if TYPE_CHECKING:
    from conftest import Watch

__all__ = ["FAST", "JOBS_DONE_S", "files", "open_form", "step", "submit", "succeeded"]

FAST = {"latency_runs": 5, "warmup_runs": 1}  # evaluation options: few timed runs, small jobs
JOBS_DONE_S = 300  # an upper bound for a batch of small jobs on a loaded 2-core machine, not an expected time


def files(tmp_path: Path) -> tuple[Path, Path]:
    """A small MLP (input x [N, 64]; 64x128 and 128x128 MatMul weights) and a calibration .npz for it."""
    model = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(), model)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
    return model, calibration


def submit(page: Page) -> str:
    """Press Compress once the server's plan check has accepted the plan; the new job's id."""
    expect(page.locator("#plan-status")).to_have_text("The server accepts this plan.")
    page.get_by_role("button", name="Compress").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    return page.url.rsplit("/", 1)[1]


def succeeded(page: Page, url: str, job_id: str) -> dict[str, Any]:
    """Wait on the job's page until it ends; it must have succeeded. The job as the API gives it."""
    page.goto(f"{url}/jobs/{job_id}")
    expect(page.locator("#job-state")).to_have_text(re.compile("succeeded|failed"), timeout=JOBS_DONE_S * 1000)
    job: dict[str, Any] = page.request.get(f"{url}/api/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["error"]
    expect(page.locator("#figures")).to_be_visible()
    return job


def step(page: Page, kind: str) -> Locator:
    """The builder's step of this kind."""
    return page.locator(f"#steps .step[data-kind={kind}]")


def open_form(page: Page, serve: Callable[..., str], watch: Watch, *, plan: str = "") -> str:
    """Start the app, watch the page for problems on its origin and open the form; the app's URL.

    plan: a step kind to start from instead of the default plan's quantize step (which is removed).
    """
    url = serve()
    watch.origin = url
    page.goto(f"{url}/")
    if plan:
        step(page, "quantize").get_by_role("button", name="Remove").click()
        page.get_by_role("button", name=f"+ {plan}").click()
    return url
