"""Every preset and every step kind through the real form, each kind of control changed once, to a succeeded job.

The plan the server recorded is compared with the one the controls were set to, so a control that sends a value
of the wrong type (a select's "8" for the number 8) fails here, and each job must succeed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import pytest

from service.form_schema import PRESETS

pytest.importorskip("playwright", reason="pip install pytest-playwright")

from form_pages import files, step, submit, succeeded
from playwright.sync_api import Page, expect

if TYPE_CHECKING:
    from conftest import Watch


def test_every_preset_runs_to_a_succeeded_job(
    page: Page, serve: Callable[..., str], tmp_path: Path, artifacts: Path, watch: Watch
) -> None:
    url = serve(workers=2)  # six jobs: two at a time on CI's two cores
    watch.origin = url
    model, calibration = files(tmp_path)
    submitted = []
    for title, _, plan in PRESETS:
        page.goto(f"{url}/")
        page.get_by_role("button", name=title).click()
        expect(page.get_by_role("button", name=title)).to_have_class(re.compile(r"\bactive\b"))
        page.locator("#model").set_input_files(model)
        if any(s.get("mode") == "static" for s in plan["steps"]):
            expect(page.locator("#calibration-req")).to_be_visible()
            page.locator("#calibration").set_input_files(calibration)
        submitted.append((title, plan, submit(page)))

    from onnx_ops.plan import Plan

    for title, plan, job_id in submitted:
        job = succeeded(page, url, job_id)
        assert job["plan"] == Plan.model_validate(plan).model_dump(mode="json"), title

    # The jobs list tells each one's result.
    page.goto(f"{url}/")
    for _, _, job_id in submitted:
        expect(page.locator(f'tr[data-job-id="{job_id}"] td.outcome')).to_have_text(
            re.compile(r"(smaller|larger|no change) \(.+ → .+\)")
        )
    page.locator("#jobs").screenshot(path=artifacts / "jobs-list.png")
    assert watch.problems == []


def test_every_step_kind_and_every_kind_of_control(
    page: Page, serve: Callable[..., str], tmp_path: Path, artifacts: Path, watch: Watch
) -> None:
    url = serve()
    watch.origin = url
    model, _ = files(tmp_path)
    page.goto(f"{url}/")
    # The default plan is one dynamic quantize step; new steps go before it (quantize must stay last).
    page.get_by_role("button", name="+ prune").click()
    page.get_by_role("button", name="+ svd").click()
    assert page.locator("#steps > .step").evaluate_all("els => els.map(e => e.dataset.kind)") == [
        "prune",
        "svd",
        "quantize",
    ]

    prune = step(page, "prune")
    prune.locator("[data-field=method] select").select_option("n:m")  # a select of text
    expect(prune.locator("[data-field=n]")).to_be_visible()
    expect(prune.locator("[data-field=sparsity]")).to_be_visible()
    prune.locator("[data-field=n] input").fill("1")  # an int
    prune.locator("[data-field=op_types]").get_by_label("Conv", exact=True).uncheck()  # a multiple choice
    prune.locator("[data-field=exclude_nodes] input").fill("fc2")  # a list of text
    prune.locator("[data-field=min_elements] input").fill("128")

    svd = step(page, "svd")
    svd.locator("[data-field=rank] input").fill("16")  # an optional int
    svd.locator("[data-field=max_rel_error] input").fill("0.9")  # a float
    svd.locator("[data-field=algorithm] select").select_option("exact")

    quantize = step(page, "quantize")
    quantize.locator("[data-field=embedding_bits] select").select_option("4")  # a select of numbers
    quantize.locator("[data-field=per_channel]").get_by_role("checkbox").uncheck()  # a bool
    quantize.locator("[data-field=reduce_range]").get_by_role("checkbox").check()
    quantize.locator("[data-field=op_types] input").fill("MatMul")  # an optional list

    page.locator("#plan-options summary").click()
    evaluation = page.locator("[data-group=evaluation]")
    evaluation.locator("[data-field=latency_runs] input").fill("5")
    evaluation.locator("[data-field=warmup_runs] input").fill("1")

    expected = {
        "steps": [
            {
                "kind": "prune",
                "method": "n:m",
                "n": 1,
                "op_types": ["MatMul", "Gemm", "LSTM", "GRU", "RNN"],
                "exclude_nodes": ["fc2"],
                "min_elements": 128,
            },
            {"kind": "svd", "rank": 16, "max_rel_error": 0.9, "algorithm": "exact"},
            {
                "kind": "quantize",
                "per_channel": False,
                "op_types": ["MatMul"],
                "reduce_range": True,
                "embedding_bits": 4,
            },
        ],
        "evaluation": {"latency_runs": 5, "warmup_runs": 1},
    }
    assert json.loads(page.locator("#plan").input_value()) == expected
    page.locator("#model").set_input_files(model)
    expect(page.locator("#plan-status")).to_have_text("The server accepts this plan.")
    page.screenshot(path=artifacts / "form-every-step.png", full_page=True)
    job_id = submit(page)

    job = succeeded(page, url, job_id)
    from onnx_ops.plan import Plan

    assert job["plan"] == Plan.model_validate(expected).model_dump(mode="json")
    report = page.request.get(f"{url}/api/jobs/{job_id}/report").json()
    assert [s["kind"] for s in report["steps"]] == ["prune", "svd", "quantize"]
    assert report["after"]["size_bytes"] < report["before"]["size_bytes"]
    assert watch.problems == []


def test_the_builder_keeps_the_plan_rules_before_anything_is_uploaded(
    page: Page, serve: Callable[..., str], tmp_path: Path, artifacts: Path, watch: Watch
) -> None:
    url = serve()
    watch.origin = url
    model, _ = files(tmp_path)
    page.goto(f"{url}/")
    page.locator("#model").set_input_files(model)

    # Steps the schema would refuse cannot be added: a second quantize, auto beside other steps.
    expect(page.get_by_role("button", name="+ quantize")).to_be_disabled()
    expect(page.get_by_role("button", name="+ auto")).to_be_disabled()
    expect(page.locator("#add-rules")).to_contain_text("auto")
    step(page, "quantize").get_by_role("button", name="Remove").click()
    page.get_by_role("button", name="+ auto").click()
    for kind in ("prune", "svd", "quantize", "auto"):
        expect(page.get_by_role("button", name=f"+ {kind}")).to_be_disabled()
    step(page, "auto").get_by_role("button", name="Remove").click()

    # A value out of range is marked at its field with the server's reason, and nothing is uploaded.
    page.get_by_role("button", name="+ svd").click()
    energy = step(page, "svd").locator("[data-field=energy]")
    energy.locator("input").fill("0")
    expect(energy.locator(".problem")).to_contain_text("greater than 0")
    expect(page.locator("#plan-problems")).to_contain_text("energy")
    page.get_by_role("button", name="Compress").click()
    expect(page.locator("#submit-status")).to_contain_text("Not sent")
    page.screenshot(path=artifacts / "form-refused-plan.png", full_page=True)
    energy.locator("input").fill("0.95")
    expect(energy.locator(".problem")).to_be_hidden()

    # A step moved below quantize is refused as a rule of the whole plan.
    page.get_by_role("button", name="+ quantize").click()
    step(page, "quantize").get_by_role("button", name="Move up").click()
    expect(page.locator("#plan-problems")).to_contain_text("quantize must be the last step")
    step(page, "quantize").get_by_role("button", name="Move down").click()
    expect(page.locator("#plan-problems")).to_be_hidden()

    # JSON typed by hand with a number as text is marked at the control it belongs to.
    page.locator("#plan").fill(json.dumps({"steps": [{"kind": "quantize", "embedding_bits": "8"}]}))
    bits = step(page, "quantize").locator("[data-field=embedding_bits]")
    expect(bits.locator(".problem")).to_contain_text("8 or 4")
    page.get_by_role("button", name="Compress").click()
    expect(page.locator("#submit-status")).to_contain_text("Not sent")

    # Nothing was uploaded, and the chosen model is still chosen.
    assert page.request.get(f"{url}/api/jobs").json() == []
    assert page.locator("#model").evaluate("el => el.files.length") == 1
    assert watch.problems == []


def test_a_static_only_quantize_field_goes_with_static_mode_only(
    page: Page, serve: Callable[..., str], tmp_path: Path, watch: Watch
) -> None:
    url = serve()
    watch.origin = url
    model, _ = files(tmp_path)
    page.goto(f"{url}/")
    page.locator("#model").set_input_files(model)
    quantize = step(page, "quantize")
    quantize.locator("[data-field=mode] select").select_option("static")
    quantize.locator("[data-field=recovery_target] select").select_option("float_outputs")
    assert json.loads(page.locator("#plan").input_value())["steps"][0]["recovery_target"] == "float_outputs"

    # Back in dynamic mode the field is hidden and left out of the plan, which the server accepts.
    quantize.locator("[data-field=mode] select").select_option("dynamic")
    expect(quantize.locator("[data-field=recovery_target]")).to_be_hidden()
    assert "recovery_target" not in json.loads(page.locator("#plan").input_value())["steps"][0]
    expect(page.locator("#plan-status")).to_have_text("The server accepts this plan.")

    # Typed by hand into a dynamic step, it is refused at the step, naming the field and the mode.
    page.locator("#plan").fill(json.dumps({"steps": [{"kind": "quantize", "recovery_target": "float_outputs"}]}))
    expect(step(page, "quantize").locator(".step-problem")).to_contain_text(
        "recovery_target applies to static quantization only; remove it or set mode to static"
    )
    page.get_by_role("button", name="Compress").click()
    expect(page.locator("#submit-status")).to_contain_text("Not sent")
    assert page.request.get(f"{url}/api/jobs").json() == []
    assert watch.problems == []


def test_a_refused_upload_keeps_the_plan_and_names_the_files_to_choose_again(
    page: Page, serve: Callable[..., str], tmp_path: Path, watch: Watch
) -> None:
    # A disk-space floor no disk meets: the plan is fine, the upload itself is refused (507).
    url = serve(min_free_disk_mb=1 << 40)
    watch.origin = url
    model, calibration = files(tmp_path)
    page.goto(f"{url}/")
    page.get_by_role("button", name="Structured prune 30% + static int8").click()
    step(page, "prune").locator("[data-field=sparsity] input").fill("0.25")
    page.locator("#model").set_input_files(model)
    page.locator("#calibration").set_input_files(calibration)
    expect(page.locator("#plan-status")).to_have_text("The server accepts this plan.")
    plan = json.loads(page.locator("#plan").input_value())
    page.get_by_role("button", name="Compress").click()

    expect(page.locator("#form-error")).to_contain_text("insufficient_storage")
    expect(page.locator("#refill-list")).to_have_text("choose model (mlp.onnx), calibration (calibration.npz) again")
    expect(page.locator("#model").locator("xpath=ancestor::div[contains(@class,'field')]")).to_contain_text(
        "Choose mlp.onnx again"
    )
    assert json.loads(page.locator("#plan").input_value()) == plan  # the plan as it was sent
    expect(step(page, "prune").locator("[data-field=sparsity] input")).to_have_value("0.25")  # and its controls
    # 507 is the page's status: Chromium logs it as a failed resource load, which is the point of this test.
    watch.problems = [p for p in watch.problems if "status of 507" not in p]
    assert watch.problems == []


def _open_conv_net() -> onnx.ModelProto:
    """A small CNN whose input is [-1, 3, h, ?]: batch, height and width left open, as exported detectors are."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1, name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "open",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_model_with_open_dimensions_is_asked_for_its_shape_up_front(
    page: Page, serve: Callable[..., str], tmp_path: Path, watch: Watch
) -> None:
    url = serve()
    watch.origin = url
    path = tmp_path / "open.onnx"
    onnx.save(_open_conv_net(), path)
    mlp, _ = files(tmp_path)
    page.goto(f"{url}/")
    shapes = page.locator("#model-shapes")
    expect(shapes).to_be_hidden()  # nothing to ask before a model is chosen

    page.locator("#model").set_input_files(mlp)  # input [N, 64]: only the batch dimension is open
    expect(page.locator("#model-inputs")).to_have_text("mlp.onnx takes x [N, 64].")
    expect(shapes).to_be_hidden()

    page.locator("#model").set_input_files(path)  # read in the browser, before any upload
    note = page.locator("#model-inputs")
    expect(note).to_contain_text("open.onnx takes x [?, 3, h, ?]. x leaves dimensions open")
    expect(note).to_have_class(re.compile(r"\bwarn\b"))
    expect(shapes).to_be_visible()
    field = shapes.locator("[data-field=input_shapes] input")
    expect(field).to_have_attribute("placeholder", "x: 1, 3, ?, ?")
    field.fill("x: 1, 3, 16, 20")
    expect(note).not_to_have_class(re.compile(r"\bwarn\b"))
    assert json.loads(page.locator("#plan").input_value())["input_shapes"] == {"x": [1, 3, 16, 20]}

    job_id = submit(page)
    job = succeeded(page, url, job_id)
    assert job["plan"]["input_shapes"] == {"x": [1, 3, 16, 20]}  # the last kind of control: input -> shape
    assert watch.problems == []
