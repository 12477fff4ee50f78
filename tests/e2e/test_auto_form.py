"""The auto step through the web form: its widgets come from the schema, and a job with it reports the search."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import digits

pytest.importorskip("playwright", reason="pip install pytest-playwright")

from playwright.sync_api import Page, expect

JOB_DONE_S = 300  # bounds a hang: a small auto job on a loaded 2-core host, not an expected time


def test_auto_step_through_the_form(page: Page, serve: Callable[..., str], tmp_path: Path, artifacts: Path) -> None:
    url = serve()
    d = digits.digits()
    name = d.model.graph.input[0].name
    (tmp_path / "digits.onnx").write_bytes(d.model.SerializeToString())
    np.savez(
        tmp_path / "eval.npz", **{name: d.x_test[:200].reshape(4, 50, 64), "labels": d.y_test[:200].reshape(4, 50)}
    )
    np.savez(tmp_path / "calib.npz", **{name: d.x_train[:128]})

    page.goto(f"{url}/")
    page.locator("#steps .step[data-kind=quantize]").get_by_role("button", name="Remove").click()
    page.get_by_role("button", name="+ auto").click()
    step = page.locator("#steps .step[data-kind=auto]")
    expect(step.locator("[data-field=min_cosine]")).to_be_visible()
    expect(step.locator("[data-field=max_accuracy_drop]")).to_be_hidden()
    step.locator("[data-field=budget] select").select_option("accuracy")
    expect(step.locator("[data-field=max_accuracy_drop]")).to_be_visible()  # the accuracy-only field appears
    expect(step.locator("[data-field=min_cosine]")).to_be_hidden()
    for family in ("prune", "svd", "optimize", "cluster", "int4", "fp16"):
        step.locator("[data-field=families]").get_by_label(family, exact=True).uncheck()
    step.locator("[data-field=time_budget_s] input").fill("10")
    plan = json.loads(page.locator("#plan").input_value())
    assert plan["steps"] == [{"kind": "auto", "budget": "accuracy", "families": ["quantize"], "time_budget_s": 10}]

    page.locator("#model").set_input_files(tmp_path / "digits.onnx")
    page.locator("#calibration").set_input_files(tmp_path / "calib.npz")
    page.locator("#evaluation").set_input_files(tmp_path / "eval.npz")
    page.get_by_role("button", name="Compress").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=JOB_DONE_S * 1000)
    report = page.request.get(f"{url}/api/jobs/{job_id}/report").json()
    assert report["schema_version"] == "1.2" and report["cpu"]["note"]
    assert report["auto"]["status"] in ("met", "original") and report["auto"]["candidates"]
    frame = page.frame_locator("#report-frame")
    expect(frame.get_by_role("heading", name="Automatic search")).to_be_visible()
    expect(frame.locator("#cpu-note")).to_be_visible()
    page.screenshot(path=artifacts / "auto-report-page.png", full_page=True)
