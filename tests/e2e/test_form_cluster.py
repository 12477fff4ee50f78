"""The optimize and cluster steps, built with the form's controls into a succeeded job.

The builder must offer both, keep cluster as a final step (no quantize, int4 or fp16 beside it, new steps go
before it), show kmeans++'s seed only with that init, and send the plan the controls were set to.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

pytest.importorskip("playwright", reason="pip install pytest-playwright")

from form_pages import FAST, files, open_form, step, submit, succeeded
from playwright.sync_api import Page, expect

from onnx_ops.plan import FINAL_KINDS, Plan

if TYPE_CHECKING:
    from conftest import Watch


def test_optimize_prune_and_cluster_built_with_the_controls_run(
    page: Page, serve: Callable[..., str], tmp_path: Path, artifacts: Path, watch: Watch
) -> None:
    url = open_form(page, serve, watch, plan="cluster")
    model, _ = files(tmp_path)
    for kind in FINAL_KINDS:  # cluster is one of them: no second final step
        expect(page.get_by_role("button", name=f"+ {kind}")).to_be_disabled()
    page.get_by_role("button", name="+ prune").click()
    page.get_by_role("button", name="+ optimize").click()
    page.locator("#steps > .step[data-kind=optimize]").get_by_role("button", name="Move up").click()
    kinds = page.locator("#steps > .step").evaluate_all("els => els.map(e => e.dataset.kind)")
    assert kinds == ["optimize", "prune", "cluster"]

    cluster = step(page, "cluster")
    expect(cluster.locator("[data-field=seed]")).to_be_visible()  # kmeans++ only
    cluster.locator("[data-field=init] select").select_option("quantile")
    expect(cluster.locator("[data-field=seed]")).to_be_hidden()
    cluster.locator("[data-field=bits] input").fill("9")
    expect(cluster.locator("[data-field=bits] .problem")).to_contain_text("less than or equal to 8")
    cluster.locator("[data-field=bits] input").fill("3")
    cluster.locator("[data-field=min_elements] input").fill("1024")
    step(page, "prune").locator("[data-field=sparsity] input").fill("0.4")
    page.locator("#plan-options summary").click()
    for name, value in FAST.items():
        page.locator(f"[data-group=evaluation] [data-field={name}] input").fill(str(value))
    page.locator("#model").set_input_files(model)
    expect(page.locator("#calibration-req")).to_be_hidden()
    expect(page.locator("#plan-status")).to_have_text("The server accepts this plan.")
    page.screenshot(path=artifacts / "form-optimize-prune-cluster.png", full_page=True)

    expected = {
        "steps": [
            {"kind": "optimize"},
            {"kind": "prune", "sparsity": 0.4},
            {"kind": "cluster", "bits": 3, "init": "quantile", "min_elements": 1024},
        ],
        "evaluation": FAST,
    }
    assert json.loads(page.locator("#plan").input_value()) == expected
    job = succeeded(page, url, submit(page))
    assert job["plan"] == Plan.model_validate(expected).model_dump(mode="json")
    report = page.request.get(f"{url}/api/jobs/{job['id']}/report").json()
    optimized, pruned, clustered = report["steps"]
    assert optimized["summary"]["nodes_after"] <= optimized["summary"]["nodes_before"]
    assert pruned["kind"] == "prune"
    assert clustered["summary"]["folded_at_load"] is True and clustered["summary"]["weights_clustered"] == 3
    assert all("0 kept" in layer["note"] for layer in clustered["layers"])  # the pruned zeros stay zeros
    assert report["after"]["size_bytes"] < 0.2 * report["before"]["size_bytes"]
    assert watch.problems == []
