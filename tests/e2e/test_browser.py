"""Drive the real web form in headless Chromium: plan builder, upload, progress, report, download, login."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

import models

pytest.importorskip("playwright", reason="pip install pytest-playwright")

from playwright.sync_api import ConsoleMessage, Dialog, Page, expect

JOB_DONE_S = 300  # bounds a hang: a small job on a loaded 2-core host, not an expected time


def _no_dialogs(page: Page) -> list[str]:
    """Fail on any alert/confirm (an escaping bug would run a model name's script) and on CSP refusals."""
    problems: list[str] = []

    def dialog(d: Dialog) -> None:
        problems.append(f"dialog: {d.message}")
        d.dismiss()

    def console(msg: ConsoleMessage) -> None:
        if msg.type == "error" and "Content Security Policy" in msg.text:
            problems.append(f"CSP: {msg.text}")

    page.on("dialog", dialog)
    page.on("console", console)
    return problems


def test_prune_50_through_the_form(page: Page, serve: Callable[..., str], tmp_path: Path, artifacts: Path) -> None:
    url = serve()
    problems = _no_dialogs(page)
    model_path = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(), model_path)

    page.goto(f"{url}/")
    # The form starts with one dynamic-int8 step; a new step goes before it (quantize must stay last).
    page.get_by_role("button", name="+ prune").click()
    expect(page.locator("#steps > .step")).to_have_count(2)
    assert page.locator("#steps > .step").evaluate_all("els => els.map(e => e.dataset.kind)") == ["prune", "quantize"]
    # Make it a plain 50% unstructured prune using the widgets.
    page.locator("#steps .step[data-kind=quantize]").get_by_role("button", name="Remove").click()
    expect(page.locator("#steps > .step")).to_have_count(1)
    step = page.locator("#steps .step[data-kind=prune]")
    step.locator("[data-field=method] select").select_option("structured")
    expect(step.locator("[data-field=norm]")).to_be_visible()  # structured-only field appears
    step.locator("[data-field=method] select").select_option("unstructured")
    expect(step.locator("[data-field=norm]")).to_be_hidden()
    step.locator("[data-field=sparsity] input").fill("0.5")
    plan = json.loads(page.locator("#plan").input_value())
    assert plan["steps"][0]["kind"] == "prune" and plan["steps"][0].get("sparsity", 0.5) == 0.5
    expect(page.get_by_role("button", name="Prune 50%")).to_have_class(re.compile(r"\bactive\b"))

    page.locator("#model").set_input_files(model_path)
    page.get_by_role("button", name="Compress").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    job_id = page.url.rsplit("/", 1)[1]
    page.screenshot(path=artifacts / "job-page-early.png")  # queued or running (or done, on a fast machine)
    expect(page.locator("#figures")).to_be_visible(timeout=JOB_DONE_S * 1000)
    expect(page.locator("#job-state")).to_have_text("succeeded")

    # Empty optional file inputs are left out of the upload (browsers would send them as empty files).
    assert page.request.get(f"{url}/api/jobs/{job_id}").json()["inputs"] == ["model"]
    report = page.request.get(f"{url}/api/jobs/{job_id}/report").json()
    before, after = report["before"], report["after"]
    assert 0.45 < after["zero_fraction"] < 0.55
    assert before["parameters"] == after["parameters"]
    zeros = page.locator("[data-figure=zeros] .v")
    expect(zeros).to_contain_text(f"→ {after['zero_fraction'] * 100:.1f}%")
    expect(page.locator("[data-figure=parameters] .v")).to_have_text(
        f"{before['parameters']:,} → {after['parameters']:,}"
    )
    expect(page.locator("#sizes")).to_contain_text(f"{before['size_bytes']:,} → {after['size_bytes']:,} bytes")

    frame = page.frame_locator("#report-frame")
    expect(frame.get_by_role("heading", name="ONNX compression report")).to_be_visible()
    expect(frame.locator("svg").first).to_be_visible()
    page.wait_for_function("document.getElementById('report-frame').offsetHeight > 1000")  # sized to content
    page.screenshot(path=artifacts / "report-page.png", full_page=True)

    with page.expect_download() as download_info:
        page.locator("#download").click()
    download = download_info.value
    assert download.suggested_filename == "mlp.compressed.onnx"
    saved = tmp_path / "downloaded.onnx"
    download.save_as(saved)

    import onnxruntime as ort

    session = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.ones((2, 64), np.float32)})
    assert out.shape == (2, 10)
    assert problems == []


def test_token_login(page: Page, serve: Callable[..., str], tmp_path: Path, artifacts: Path) -> None:
    url = serve(token="s3cret-token")
    problems = _no_dialogs(page)
    # A job created through the API with the bearer header shows up in the list after logging in.
    created = page.request.post(
        f"{url}/api/jobs",
        headers={"Authorization": "Bearer s3cret-token"},
        multipart={
            "model": {"name": "listed.onnx", "mimeType": "application/octet-stream", "buffer": b"not a model"},
            "plan": json.dumps({"steps": [{"kind": "quantize"}]}),
        },
    )
    assert created.status == 202, created.text()
    assert page.request.get(f"{url}/api/jobs").status == 401  # no cookie yet

    page.goto(f"{url}/")
    expect(page).to_have_url(f"{url}/login")
    page.get_by_label("Access token").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-error")).to_be_visible()
    expect(page).to_have_url(f"{url}/login")

    page.get_by_label("Access token").fill("s3cret-token")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{url}/")
    expect(page.locator("table.jobs")).to_contain_text("listed.onnx")
    cookie = next(c for c in page.context.cookies() if c["name"] == "compress_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.request.get(f"{url}/api/jobs").status == 200  # the API takes the cookie too
    page.screenshot(path=artifacts / "form-page.png", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=artifacts / "form-page-narrow.png", full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(f"{url}/login")
    page.goto(f"{url}/")
    expect(page).to_have_url(f"{url}/login")
    assert problems == []


def test_model_name_is_shown_as_text(page: Page, serve: Callable[..., str]) -> None:
    url = serve()
    problems = _no_dialogs(page)
    evil = "<img src=x onerror=alert(1)><script>alert(2)<script>.onnx"  # no slash: uploads keep the base name
    page.goto(f"{url}/")
    page.locator("#model").set_input_files(
        {"name": evil, "mimeType": "application/octet-stream", "buffer": models.mlp().SerializeToString()}
    )
    page.get_by_role("button", name="Compress").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    expect(page.locator("h1")).to_have_text(evil)
    assert page.locator("h1 img, h1 script").count() == 0
    page.goto(f"{url}/")
    expect(page.locator("table.jobs td.name a")).to_have_text(evil)
    assert page.locator("table.jobs img").count() == 0
    assert problems == []
