"""The step kinds that came after the first form: int4, fp16 and distill, built with the form's controls.

Each plan is built by clicking and typing, submitted, and must end in a succeeded job whose recorded plan is the
one the controls were set to; on the way, the builder must keep the plan's rules (one of quantize, int4 and fp16,
as the last step; distill after a prune or an svd) and ask for the calibration file exactly when the plan needs it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("playwright", reason="pip install pytest-playwright")

from form_pages import FAST, files, open_form, step, submit, succeeded
from playwright.sync_api import Page, expect

from onnx_ops.plan import FINAL_KINDS, Plan

if TYPE_CHECKING:
    from conftest import Watch


def _fast_evaluation(page: Page) -> None:
    page.locator("#plan-options summary").click()
    for name, value in FAST.items():
        page.locator(f"[data-group=evaluation] [data-field={name}] input").fill(str(value))


def _kinds(page: Page) -> list[str]:
    kinds: list[str] = page.locator("#steps > .step").evaluate_all("els => els.map(e => e.dataset.kind)")
    return kinds


def _recorded(page: Page, url: str, job_id: str, expected: dict[str, Any]) -> dict[str, Any]:
    """The succeeded job's report, after checking the server recorded the plan the controls were set to."""
    job = succeeded(page, url, job_id)
    assert job["plan"] == Plan.model_validate(expected).model_dump(mode="json")
    report: dict[str, Any] = page.request.get(f"{url}/api/jobs/{job_id}/report").json()
    assert [s["kind"] for s in report["steps"]] == [s["kind"] for s in expected["steps"]]
    return report


def test_prune_then_distill_asks_for_calibration_data_and_runs(
    page: Page, serve: Callable[..., str], tmp_path: Path, artifacts: Path, watch: Watch
) -> None:
    url = open_form(page, serve, watch, plan="svd")
    model, calibration = files(tmp_path)
    expect(page.get_by_role("button", name="+ distill")).to_be_enabled()  # svd's factors can be refit
    step(page, "svd").get_by_role("button", name="Remove").click()
    expect(page.get_by_role("button", name="+ distill")).to_be_disabled()  # nothing pruned or factorized yet
    page.get_by_role("button", name="+ prune").click()
    page.get_by_role("button", name="+ distill").click()
    assert _kinds(page) == ["prune", "distill"]
    prune = step(page, "prune")
    prune.locator("[data-field=method] select").select_option("structured")
    prune.locator("[data-field=method] select").select_option("unstructured")
    prune.locator("[data-field=sparsity] input").fill("0.5")
    _fast_evaluation(page)
    page.locator("#model").set_input_files(model)

    # The server's rule (Plan.calibration_user) marks the file required, and the plan is refused without it.
    expect(page.locator("#calibration-req")).to_have_text("required for distill")
    expect(page.locator("#plan-problems")).to_contain_text("distill needs calibration data")
    page.get_by_role("button", name="Compress").click()
    expect(page.locator("#submit-status")).to_contain_text("Not sent")
    expect(page.locator("#calibration-field .problem")).to_have_text("Choose a calibration .npz.")
    page.locator("#calibration").set_input_files(calibration)
    expect(page.locator("#calibration-field .problem")).to_be_hidden()
    expect(page.locator("#plan-status")).to_have_text("The server accepts this plan.")
    page.screenshot(path=artifacts / "form-prune-distill.png", full_page=True)

    expected = {"steps": [{"kind": "prune"}, {"kind": "distill"}], "evaluation": FAST}  # the JSON leaves out defaults
    assert json.loads(page.locator("#plan").input_value()) == expected
    _recorded(page, url, submit(page), expected)
    recorded = page.request.get(f"{url}/api/jobs").json()[0]["plan"]["steps"][0]
    assert (recorded["method"], recorded["sparsity"]) == ("unstructured", 0.5)
    assert watch.problems == []


def test_int4_with_a_block_size_set_by_its_control_runs(
    page: Page, serve: Callable[..., str], tmp_path: Path, artifacts: Path, watch: Watch
) -> None:
    url = open_form(page, serve, watch)
    model, _ = files(tmp_path)  # its 64x128 and 128x128 MatMul weights are above int4's min_elements (4096)
    # The default plan's quantize is one of the final kinds: no int4 or fp16 beside it.
    for kind in FINAL_KINDS:
        expect(page.get_by_role("button", name=f"+ {kind}")).to_be_disabled()
    expect(page.locator("#add-rules")).to_contain_text("at most one of quantize, int4, fp16")
    step(page, "quantize").get_by_role("button", name="Remove").click()
    page.get_by_role("button", name="+ int4").click()
    for kind in FINAL_KINDS:
        expect(page.get_by_role("button", name=f"+ {kind}")).to_be_disabled()
    page.get_by_role("button", name="+ prune").click()  # new steps go before the final one
    assert _kinds(page) == ["prune", "int4"]
    step(page, "prune").get_by_role("button", name="Remove").click()

    int4 = step(page, "int4")
    expect(int4.locator("[data-field=method] select")).to_have_value('"rtn"')
    int4.locator("[data-field=method] select").select_option("gptq")  # gptq fits on calibration data
    expect(page.locator("#calibration-req")).to_have_text("required for int4 with method gptq")
    int4.locator("[data-field=method] select").select_option("rtn")
    expect(page.locator("#calibration-req")).to_be_hidden()
    int4.locator("[data-field=block_size] input").fill("64")
    _fast_evaluation(page)
    page.locator("#model").set_input_files(model)
    expect(page.locator("#plan-status")).to_have_text("The server accepts this plan.")
    page.screenshot(path=artifacts / "form-int4.png", full_page=True)

    expected = {"steps": [{"kind": "int4", "block_size": 64}], "evaluation": FAST}
    assert json.loads(page.locator("#plan").input_value()) == expected
    report = _recorded(page, url, submit(page), expected)
    assert report["after"]["size_bytes"] < report["before"]["size_bytes"]
    assert watch.problems == []


def test_fp16_runs_and_halves_the_model(
    page: Page, serve: Callable[..., str], tmp_path: Path, artifacts: Path, watch: Watch
) -> None:
    url = open_form(page, serve, watch, plan="fp16")
    model, _ = files(tmp_path)
    expect(page.get_by_role("button", name="+ quantize")).to_be_disabled()
    expect(page.locator("#calibration-req")).to_be_hidden()
    _fast_evaluation(page)
    page.locator("#model").set_input_files(model)
    expect(page.locator("#plan-status")).to_have_text("The server accepts this plan.")
    page.screenshot(path=artifacts / "form-fp16.png", full_page=True)

    expected = {"steps": [{"kind": "fp16"}], "evaluation": FAST}
    assert json.loads(page.locator("#plan").input_value()) == expected
    report = _recorded(page, url, submit(page), expected)
    assert report["after"]["size_bytes"] < 0.6 * report["before"]["size_bytes"]
    assert watch.problems == []
