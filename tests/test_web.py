"""The web pages without a browser: form rendering from the schema, form posts, job page, 404, login."""

from __future__ import annotations

import html
import json
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from onnx_ops import compress, save_report
from onnx_ops.html_report import fold_ratio, render_html
from onnx_ops.plan import (
    AutoStep,
    ClusterStep,
    DistillStep,
    EvaluationOptions,
    Fp16Step,
    Int4Step,
    OptimizeStep,
    Plan,
    PruneStep,
    QuantizeStep,
    Step,
    SvdStep,
)
from service import form_schema, web
from service.jobs import JobError, JobState, JobStore
from service.main import create_app
from service.settings import Settings

import models

EVIL = "<img src=x onerror=alert(1)>.onnx"


def _client(tmp_path: Path, **overrides: object) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", min_free_disk_mb=0, allowed_hosts=["testserver"], **overrides)
    with TestClient(create_app(settings, embedded_worker=False)) as client:
        yield client


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path)


@pytest.fixture
def token_client(tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path, token="letmein")


def _store(client: TestClient) -> JobStore:
    store: JobStore = client.app.state.queue.store  # type: ignore[attr-defined]
    return store


def _template(html: str, kind: str) -> str:
    match = re.search(rf'<template id="tpl-step-{kind}">(.*?)</template>', html, re.S)
    assert match, f"no template for {kind}"
    return match.group(1)


def _post(client: TestClient, plan: str, name: str = "m.onnx", **files: tuple[str, bytes]) -> object:
    # The plan goes first, as the browser sends it (the form puts it before the files).
    return client.post(
        "/jobs",
        data={"plan": plan},
        files={"model": (name, models.mlp().SerializeToString()), **files},
        follow_redirects=False,
    )


# --- the form follows the schema --------------------------------------------------------------------------


def test_step_models_come_from_the_plan_union() -> None:
    union = typing.get_args(typing.get_args(Step)[0])
    kinds = ["optimize", "prune", "svd", "distill", "quantize", "int4", "fp16", "cluster", "auto"]
    assert [f.kind for f in web.step_forms()] == kinds
    assert set(union) == {*_STEP_MODELS, AutoStep}


_STEP_MODELS = [OptimizeStep, PruneStep, SvdStep, DistillStep, QuantizeStep, Int4Step, Fp16Step, ClusterStep]


@pytest.mark.parametrize("model", [*_STEP_MODELS, AutoStep])
def test_form_renders_every_step_field(client: TestClient, model: type[BaseModel]) -> None:
    html = client.get("/").text
    kind = model.model_fields["kind"].default
    block = _template(html, kind)
    for name, info in model.model_fields.items():
        if name == "kind":
            continue
        assert f'data-field="{name}"' in block, f"{kind}.{name} missing from the form"
        if info.description:
            # Descriptions are shown next to the field (minus an "x only:" prefix the form turns into hiding).
            tail = re.sub(r"^[\w:+]+ only:\s*", "", info.description)[1:40]
            assert tail.replace('"', "&#34;").replace("'", "&#39;") in block, f"{kind}.{name} description"


def test_form_renders_plan_level_fields(client: TestClient) -> None:
    html = client.get("/").text
    assert 'data-field="input_shapes"' in html
    for name in EvaluationOptions.model_fields:
        assert f'data-field="{name}"' in html
    assert 'data-group="evaluation"' in html


def test_widgets_carry_types_defaults_choices_and_relevance() -> None:
    prune = {w.name: w for w in next(f for f in web.step_forms() if f.kind == "prune").widgets}
    assert prune["method"].kind == "select" and prune["method"].choices == ("unstructured", "n:m", "structured")
    assert prune["sparsity"].kind == "float" and prune["sparsity"].default == 0.5
    assert (prune["sparsity"].minimum, prune["sparsity"].maximum) == (0.0, 1.0)
    assert prune["op_types"].kind == "multi" and "Conv" in prune["op_types"].default
    assert prune["exclude_nodes"].kind == "list" and prune["exclude_nodes"].default == []
    assert prune["n"].only == ("method", "n:m") and prune["norm"].only == ("method", "structured")
    assert prune["sparsity"].only is None
    quant = {w.name: w for w in next(f for f in web.step_forms() if f.kind == "quantize").widgets}
    assert quant["op_types"].optional and quant["op_types"].default is None
    assert quant["calibration_method"].only == ("mode", "static")
    assert quant["per_channel"].kind == "bool"
    svd = {w.name: w for w in next(f for f in web.step_forms() if f.kind == "svd").widgets}
    assert svd["rank"].kind == "int" and svd["rank"].optional
    assert (svd["energy"].minimum, svd["energy"].min_exclusive, svd["energy"].max_exclusive) == (0.0, True, False)


def _choice_literals(annotation: object) -> tuple[object, ...]:
    """The allowed values of a Literal (or a list of Literals), optional or not."""
    args = (
        [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation)
        in (
            typing.Union,
            types.UnionType,
        )
        else [annotation]
    )
    inner = args[0]
    if typing.get_origin(inner) is list:
        inner = typing.get_args(inner)[0]
    return typing.get_args(inner) if typing.get_origin(inner) is typing.Literal else ()


# Choices that are only valid beside another field's value (the plan refuses them otherwise, naming it).
_NEEDS: dict[tuple[str, str], dict[str, str]] = {("PruneStep", "allocation"): {"criterion": "activation"}}


@pytest.mark.parametrize("model", [PruneStep, SvdStep, DistillStep, QuantizeStep, AutoStep])
def test_choices_are_json_values_of_the_schemas_own_type(client: TestClient, model: type[BaseModel]) -> None:
    # A select read as text sent "embedding_bits": "8", which the schema (Literal[8, 4]) refuses.
    kind = model.model_fields["kind"].default
    block = _template(client.get("/").text, kind)
    widgets = {w.name: w for w in next(f for f in web.step_forms() if f.kind == kind).widgets}
    for name, info in model.model_fields.items():
        literals = _choice_literals(info.annotation)
        if name == "kind" or not literals:
            continue
        field = re.search(rf'data-field="{name}".*?</div>', block, re.S)
        assert field, name
        raw = re.findall(r'(?:option|checkbox") value="([^"]*)"', field.group(0))
        values = [json.loads(html.unescape(v)) for v in raw]
        assert [v for v in values if v is not None] == list(literals), name
        multi = 'type="checkbox"' in field.group(0)
        for value in values:  # each choice, as the form writes it, is valid (beside the choices it needs)
            # The form sends a field tied to a switch's value (quantize's static-only fields) only with that value.
            only = widgets[name].only
            needs = {**_NEEDS.get((model.__name__, name), {}), **({only[0]: only[1]} if only else {})}
            model.model_validate_json(json.dumps({**needs, name: [value] if multi else value}))


def test_quantize_bits_choice_is_a_number() -> None:
    quant = {w.name: w for w in next(f for f in web.step_forms() if f.kind == "quantize").widgets}
    bits = quant["embedding_bits"]
    assert bits.choices == (8, 4) and bits.default == 8
    assert bits.options == [("8", "8"), ("4", "4")]
    assert quant["calibration_method"].only == ("mode", "static")


def test_unknown_field_type_fails_loudly() -> None:
    class Odd(BaseModel):
        when: complex = 1j

    with pytest.raises(TypeError, match="no widget"):
        form_schema._widget("when", Odd.model_fields["when"])


@pytest.mark.parametrize("preset", web.PRESETS, ids=[p[0] for p in web.PRESETS])
def test_presets_are_valid_plans(preset: tuple[str, str, dict[str, object]]) -> None:
    Plan.model_validate(preset[2])


def test_pages_have_no_inline_script(client: TestClient) -> None:
    response = client.get("/")
    html = response.text
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []
    assert re.findall(r"\son[a-z]+\s*=", html) == []
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_form_sends_only_the_fields_the_upload_accepts(client: TestClient) -> None:
    # The upload parser refuses any other field, so the builder's widgets must have no name attribute.
    html = client.get("/").text
    form = re.search(r'<form method="post" action="/jobs".*?</form>', html, re.S)
    assert form
    names = re.findall(r'\sname="([^"]+)"', form.group(0))
    assert sorted(names) == ["calibration", "evaluation", "model", "plan"]
    assert names[0] == "plan"  # first in the body, so a refused upload can show it again
    templates = "".join(re.findall(r"<template.*?</template>", html, re.S))  # cloned into the form
    assert templates and re.search(r'\sname="', templates) is None


# --- form posts -------------------------------------------------------------------------------------------


def test_bad_plan_rerenders_the_form_with_the_error_and_the_plan(client: TestClient) -> None:
    plan = '{"steps": [{"kind": "prune", "sparsity": 1.5}], "note": "<b>x</b>"}'
    response = _post(client, plan)
    assert response.status_code == 422
    assert 'id="form-error"' in response.text
    assert "invalid_plan" in response.text
    textarea = re.search(r'<textarea name="plan"[^>]*>(.*?)</textarea>', response.text, re.S)
    assert textarea and "&#34;sparsity&#34;: 1.5" in textarea.group(1)
    assert "<b>x</b>" not in response.text
    assert _store(client).list() == []


def test_static_quantization_without_calibration_is_refused_on_the_form(client: TestClient) -> None:
    response = _post(client, json.dumps({"steps": [{"kind": "quantize", "mode": "static"}]}))
    assert response.status_code == 422
    assert "calibration" in response.text


def test_good_post_redirects_to_the_job_page(client: TestClient) -> None:
    response = _post(client, json.dumps({"steps": [{"kind": "prune"}]}), name=EVIL)
    assert response.status_code == 303
    location = response.headers["location"]
    assert re.fullmatch(r"/jobs/[0-9a-f]{32}", location)
    page = client.get(location)
    assert page.status_code == 200
    assert "&lt;img src=x onerror=alert(1)&gt;.onnx" in page.text
    assert "<img src=x" not in page.text
    assert 'id="bar-fill"' in page.text and "waiting for a worker" in page.text
    listing = client.get("/").text
    assert "&lt;img src=x onerror=alert(1)&gt;.onnx" in listing and location in listing


def test_unknown_and_malformed_job_ids_are_404_pages(client: TestClient) -> None:
    for path in ("/jobs/" + "0" * 32, "/jobs/not-an-id", "/jobs/" + "A" * 32, "/jobs/..%2e"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "text/html" in response.headers["content-type"]
        assert "Not found" in response.text


# --- the job page -----------------------------------------------------------------------------------------


def _finished_job(client: TestClient, tmp_path: Path) -> str:
    store = _store(client)
    job_id, folder = store.reserve()
    model = tmp_path / "m.onnx"
    model.write_bytes(models.mlp().SerializeToString())
    plan = {"steps": [{"kind": "prune", "sparsity": 0.5}], "evaluation": {"latency_runs": 3, "warmup_runs": 1}}
    result = compress(model, plan)
    result.save(folder / "output.onnx")
    save_report(result.report, folder / "report.json")
    (folder / "report.html").write_text(render_html(result.report), encoding="utf-8")
    store.create(job_id, Plan.model_validate(plan).model_dump(mode="json"), EVIL, ["model"])
    store.update(job_id, state=JobState.succeeded, started_at=1.0, finished_at=3.5)
    return job_id


def test_succeeded_job_shows_figures_report_and_download(client: TestClient, tmp_path: Path) -> None:
    job_id = _finished_job(client, tmp_path)
    html = client.get(f"/jobs/{job_id}").text
    report = client.get(f"/api/jobs/{job_id}/report").json()
    assert f'src="/api/jobs/{job_id}/report.html"' in html
    assert f'href="/api/jobs/{job_id}/model"' in html
    assert f"{report['before']['size_bytes']:,} → {report['after']['size_bytes']:,} bytes" in html
    assert f"{report['after']['zero_fraction'] * 100:.1f}%" in html
    for key in ("size", "gzip", "latency", "parameters", "zeros", "cosine"):
        assert f'data-figure="{key}"' in html
    assert 'id="bar-fill"' not in html  # nothing to poll
    assert "<img src=x" not in html


def test_failed_job_shows_code_and_message(client: TestClient) -> None:
    store = _store(client)
    job_id, _ = store.reserve()
    store.create(job_id, {"steps": [{"kind": "prune"}]}, "m.onnx", ["model"])
    store.finish(job_id, JobError(code="invalid_model", message="the model is <broken>"))
    html = client.get(f"/jobs/{job_id}").text
    assert "invalid_model" in html and "the model is &lt;broken&gt;" in html


def test_progress_bar_follows_the_job() -> None:
    assert web.display_fraction("queued", 0.3) == 0.0
    assert web.display_fraction("running", 0.4) == 0.4
    assert web.display_fraction("running", 7.0) == 1.0
    assert web.display_fraction("failed", 0.2) == 1.0
    assert web.stage_text("queued", None) == "waiting for a worker"
    assert web.stage_text("running", "step 1/2: prune") == "step 1/2: prune"
    assert web.stage_text("running", "evaluate").startswith("measuring")


# --- login ------------------------------------------------------------------------------------------------


def test_pages_redirect_to_login_without_the_token(token_client: TestClient) -> None:
    for method, path in (("get", "/"), ("get", "/jobs/" + "0" * 32)):
        response = getattr(token_client, method)(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login"
    response = _post(token_client, json.dumps({"steps": [{"kind": "prune"}]}))
    assert response.status_code == 303 and response.headers["location"] == "/login"  # type: ignore[attr-defined]
    assert _store(token_client).list() == []
    assert token_client.get("/healthz").status_code == 200
    assert 'name="token"' in token_client.get("/login").text


def test_login_sets_a_strict_httponly_cookie(token_client: TestClient) -> None:
    wrong = token_client.post("/login", data={"token": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and "not right" in wrong.text
    assert "set-cookie" not in wrong.headers
    right = token_client.post("/login", data={"token": "letmein"}, follow_redirects=False)
    assert right.status_code == 303 and right.headers["location"] == "/"
    cookie = right.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert token_client.get("/", follow_redirects=False).status_code == 200
    assert token_client.get("/api/jobs").status_code == 200
    out = token_client.post("/logout", follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert token_client.get("/", follow_redirects=False).status_code == 303


def test_bearer_header_also_opens_the_pages(token_client: TestClient) -> None:
    response = token_client.get("/", headers={"Authorization": "Bearer letmein"}, follow_redirects=False)
    assert response.status_code == 200


def test_login_page_without_a_token_goes_to_the_form(client: TestClient) -> None:
    response = client.get("/login", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert "Log out" not in client.get("/").text


# --- the plan check the form asks before uploading --------------------------------------------------------


def _check(client: TestClient, plan: object, files: list[str] | None = None) -> dict[str, typing.Any]:
    text = plan if isinstance(plan, str) else json.dumps(plan)
    response = client.post("/form/plan-check", json={"plan": text, "files": files or ["model"]})
    assert response.status_code == 200, response.text
    result: dict[str, typing.Any] = response.json()
    return result


def test_plan_check_refuses_what_the_upload_refuses_and_says_where(client: TestClient) -> None:
    text_bits = _check(client, {"steps": [{"kind": "quantize", "embedding_bits": "8"}]})
    assert not text_bits["ok"] and "embedding_bits" in text_bits["message"]
    assert [e["loc"] for e in text_bits["errors"]] == [["steps", 0, "quantize", "embedding_bits"]]
    assert _post(client, json.dumps({"steps": [{"kind": "quantize", "embedding_bits": "8"}]})).status_code == 422

    assert _check(client, {"steps": [{"kind": "quantize", "embedding_bits": 4}]}) == {
        "ok": True,
        "message": None,
        "errors": [],
        "calibration": None,
    }
    auto_and_more = _check(client, {"steps": [{"kind": "prune"}, {"kind": "auto"}]})
    assert not auto_and_more["ok"] and "only step" in auto_and_more["message"]
    assert auto_and_more["errors"][0]["loc"] == []  # a rule of the plan as a whole
    twice = _check(client, {"steps": [{"kind": "quantize"}, {"kind": "quantize"}]})
    assert not twice["ok"] and "only once" in twice["message"]
    n_m = _check(client, {"steps": [{"kind": "prune", "method": "n:m", "n": 4, "m": 4}]})
    assert n_m["errors"][0]["loc"] == ["steps", 0, "prune"]  # a rule of one step
    shapes = _check(client, {"steps": [{"kind": "prune"}], "evaluation": {"latency_runs": 0}})
    assert shapes["errors"][0]["loc"] == ["evaluation", "latency_runs"]
    assert not _check(client, "{not json")["ok"]


def test_plan_check_knows_the_file_and_deadline_rules(tmp_path: Path) -> None:
    for client in _client(tmp_path, job_timeout_s=60):
        static = {"steps": [{"kind": "quantize", "mode": "static"}]}
        assert "calibration" in _check(client, static)["message"]
        assert _check(client, static, ["model", "calibration"]) == {
            "ok": True,
            "message": None,
            "errors": [],
            "calibration": "static quantization",
        }
        # The form marks the calibration file required from this answer: the plan's own rule, every step kind.
        gptq = _check(client, {"steps": [{"kind": "int4", "method": "gptq"}]})
        assert not gptq["ok"] and gptq["calibration"] == "int4 with method gptq"
        distill = _check(client, {"steps": [{"kind": "prune"}, {"kind": "distill"}]}, ["model", "calibration"])
        assert distill["ok"] and distill["calibration"] == "distill"
        assert _check(client, {"steps": [{"kind": "int4"}, {"kind": "fp16"}]})["calibration"] is None
        long_auto = _check(client, {"steps": [{"kind": "auto", "time_budget_s": 60}]})
        assert not long_auto["ok"] and "60 s" in long_auto["message"]


def test_plan_check_refuses_malformed_and_oversized_requests(client: TestClient) -> None:
    assert client.post("/form/plan-check", json={"files": []}).status_code == 422
    assert client.post("/form/plan-check", content=b"\xff\xfe").status_code == 422
    assert client.post("/form/plan-check", json={"plan": 3}).status_code == 422
    huge = client.post("/form/plan-check", content=b" " * (300 * 1024))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "too_large"


def test_plan_check_needs_the_token(token_client: TestClient) -> None:
    response = token_client.post("/form/plan-check", json={"plan": "{}"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


# --- the jobs list, the icon, the docs' files -------------------------------------------------------------


def test_jobs_list_shows_results_and_bounded_failures(client: TestClient, tmp_path: Path) -> None:
    ok = _finished_job(client, tmp_path)
    report = client.get(f"/api/jobs/{ok}/report").json()
    ratio, _ = fold_ratio(report["before"]["size_bytes"], report["after"]["size_bytes"], "smaller", "larger")
    store = _store(client)
    bad, _ = store.reserve()
    store.create(bad, {"steps": [{"kind": "prune"}]}, "m.onnx", ["model"])
    long = "the model is <broken> " + "x" * 2000
    store.finish(bad, JobError(code="invalid_model", message=long))
    html_text = client.get("/").text
    row = re.search(rf'<tr data-job-id="{ok}">.*?</tr>', html_text, re.S)
    assert row and f'<td class="outcome same">{ratio} (' in row.group(0)
    row = re.search(rf'<tr data-job-id="{bad}">.*?</tr>', html_text, re.S)
    assert row and "invalid_model: the model is &lt;broken&gt;" in row.group(0)
    assert "<broken>" not in html_text and "x" * 1000 not in row.group(0)  # escaped and cut


def test_favicon_is_served(client: TestClient) -> None:
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response.headers["content-type"].startswith("image/svg+xml")
    assert response.content.startswith(b"<svg") and len(response.content) < 2048
    assert 'rel="icon" href="/static/favicon.svg"' in client.get("/").text


def test_docs_serve_a_swagger_ui_that_reads_openapi_3_1(client: TestClient) -> None:
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = client.get("/docs-assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200
    version = re.search(rb'PACKAGE_VERSION:"(\d+)\.', bundle.content)
    assert version and int(version.group(1)) >= 5  # 4.x renders nothing for OpenAPI 3.1
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200


def test_jobs_list_says_where_live_jobs_are(client: TestClient) -> None:
    store = _store(client)
    queued, _ = store.reserve()
    store.create(queued, {"steps": [{"kind": "prune"}]}, "q.onnx", ["model"])
    running, folder = store.reserve()
    store.create(running, {"steps": [{"kind": "prune"}]}, "r.onnx", ["model"])
    store.update(running, state=JobState.running)
    (folder / "progress.json").write_text(json.dumps({"stage": "step 1/2: prune", "fraction": 0.42}))
    page = client.get("/").text
    assert re.search(rf'<tr data-job-id="{queued}">.*?waiting for a worker</td>', page, re.S)
    assert re.search(rf'<tr data-job-id="{running}">.*?42% · step 1/2: prune</td>', page, re.S)
