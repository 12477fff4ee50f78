"""HTTP API with a real worker: every pass end to end, and every error a client can cause."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service_harness import (
    FAST,
    MULTIPART,
    ServiceClient,
    calibration_for_mlp,
    error_of,
    make_settings,
    mlp_bytes,
    multipart,
    npz_bytes,
    plan_json,
    running_service,
    submit,
    submit_ok,
    wait_for_job,
)

ORDER = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2}

PRUNE = {"kind": "prune", "method": "unstructured", "sparsity": 0.5}
NM = {"kind": "prune", "method": "n:m", "n": 2, "m": 4}
STRUCTURED = {"kind": "prune", "method": "structured", "sparsity": 0.25}
SVD = {"kind": "svd", "rank": 16}
DYNAMIC = {"kind": "quantize", "mode": "dynamic"}
STATIC = {"kind": "quantize", "mode": "static"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceClient]:
    """One app for this module: two worker threads, a 1 MB model cap."""
    settings = make_settings(tmp_path_factory.mktemp("api") / "data", workers=2, max_model_mb=1)
    with running_service(settings) as client:
        yield client


def _check_report(report: dict[str, Any], steps: list[dict[str, Any]], calibrated: bool) -> None:
    assert report["schema_version"]
    assert [s["kind"] for s in report["steps"]] == [s["kind"] for s in steps]
    before, after = report["before"], report["after"]
    assert before["parameters"] == 26122 and before["size_bytes"] > 100_000
    assert after["size_bytes"] > 0 and after["nodes"] > 0
    assert report["latency_before"]["runs"] == report["latency_after"]["runs"] >= FAST["latency_runs"]
    assert report["latency_after"]["p50_ms"] > 0
    assert report["data"]["source"] == ("calibration" if calibrated else "synthetic")
    for output in report["agreement"]["outputs"]:
        assert 0.3 < output["cosine"] <= 1.0 + 1e-6
    kinds = {s["kind"] for s in steps}
    if steps == [PRUNE] or steps == [NM]:
        assert 0.4 < after["zero_fraction"] < 0.6
        assert after["parameters"] == before["parameters"]
    if STRUCTURED in steps or "svd" in kinds:
        assert after["parameters"] < before["parameters"] * 0.7
    if "quantize" in kinds:
        assert after["size_bytes"] < before["size_bytes"] * 0.35
        assert any(op in after["op_counts"] for op in ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"))


@pytest.mark.parametrize(
    "steps",
    [[PRUNE], [NM], [STRUCTURED], [SVD], [DYNAMIC], [STATIC], [PRUNE, SVD, STATIC]],
    ids=["prune-unstructured", "prune-n:m", "prune-structured", "svd", "quantize-dynamic", "quantize-static", "chain"],
)
def test_job_runs_to_success_and_serves_report_and_model(client: ServiceClient, steps: list[dict[str, Any]]) -> None:
    static = any(s.get("mode") == "static" for s in steps)
    response = submit(
        client,
        mlp_bytes(),
        plan_json(*steps),
        model_name="my-net.onnx",
        calibration=calibration_for_mlp() if static else None,
    )
    assert response.status_code == 202, response.text
    created = response.json()
    job_id = created["id"]
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)
    assert created["state"] == "queued" and created["model_name"] == "my-net.onnx"
    assert created["inputs"] == (["calibration", "model"] if static else ["model"])

    job, seen = wait_for_job(client, job_id)
    assert job["state"] == "succeeded", job["error"]
    assert job["error"] is None and job["progress"] == 1.0 and job["finished_at"] >= job["started_at"]
    states = [ORDER[s["state"]] for s in seen]
    assert states == sorted(states), "the state went backwards"
    for answer in seen:
        assert 0.0 <= answer["progress"] <= 1.0
        if answer["state"] == "running" and answer["stage"] is not None:
            assert isinstance(answer["stage"], str) and answer["stage"]
    assert set(job["links"]) >= {"report", "report_html", "model"}

    report = client.get(f"/api/jobs/{job_id}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("application/json")
    _check_report(report.json(), steps, calibrated=static)

    page = client.get(f"/api/jobs/{job_id}/report.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<svg" in page.text and "<html" in page.text.lower()

    model = client.get(f"/api/jobs/{job_id}/model")
    assert model.status_code == 200
    assert 'filename="my-net.compressed.onnx"' in model.headers["content-disposition"]
    proto = onnx.load_from_string(model.content)
    session = ort.InferenceSession(model.content, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"x": np.ones((2, 64), np.float32)})
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    assert proto.graph.output[0].name == "logits"

    listed = client.get("/api/jobs")
    assert listed.status_code == 200
    assert job_id in [j["id"] for j in listed.json()]

    assert client.delete(f"/api/jobs/{job_id}").status_code == 204
    gone = client.get(f"/api/jobs/{job_id}")
    assert gone.status_code == 404 and error_of(gone)["code"] == "job_not_found"
    assert client.get(f"/api/jobs/{job_id}/model").status_code == 404
    assert client.delete(f"/api/jobs/{job_id}").status_code == 404


def test_jobs_are_listed_newest_first(client: ServiceClient) -> None:
    first = submit_ok(client, mlp_bytes(), plan_json(DYNAMIC))
    second = submit_ok(client, mlp_bytes(), plan_json(DYNAMIC))
    ids = [j["id"] for j in client.get("/api/jobs").json()]
    assert ids.index(second) < ids.index(first)
    for job_id in (first, second):
        wait_for_job(client, job_id)


def test_model_download_name_falls_back_when_upload_name_is_hostile(client: ServiceClient) -> None:
    job_id = submit_ok(client, mlp_bytes(), plan_json(DYNAMIC), model_name="../../etc/evil.onnx")
    assert client.get(f"/api/jobs/{job_id}").json()["model_name"] == "evil.onnx"
    job, _ = wait_for_job(client, job_id)
    assert job["state"] == "succeeded", job["error"]
    model = client.get(f"/api/jobs/{job_id}/model")
    assert 'filename="evil.compressed.onnx"' in model.headers["content-disposition"]


def test_healthz_and_openapi_docs_answer(client: ServiceClient) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    schema = client.get("/openapi.json").json()
    assert "/api/jobs" in schema["paths"] and "/api/jobs/{job_id}/report.html" in schema["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text


def test_docs_page_csp_allows_exactly_its_own_scripts(client: ServiceClient) -> None:
    import base64
    import hashlib

    docs = client.get("/docs")
    csp = docs.headers["content-security-policy"]
    script_src = next(d for d in csp.split(";") if d.strip().startswith("script-src")).split()
    for src in re.findall(r'<script src="([^"]+)"', docs.text):
        assert src.startswith("/docs-assets/"), src  # served by the app: no CDN
        assert client.get(src).status_code == 200
    for inline in re.findall(r"<script>(.*?)</script>", docs.text, re.S):
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in script_src
    assert "'unsafe-inline'" not in script_src
    # Every other page keeps the strict policy.
    assert "cdn.jsdelivr.net" not in client.get("/healthz").headers["content-security-policy"]


# ---------------------------------------------------------------- errors refused at upload


@pytest.mark.parametrize(
    ("plan", "words"),
    [
        ("{not json", "invalid plan"),
        (json.dumps({"steps": []}), "steps"),
        (json.dumps({"steps": [{"kind": "shrink"}]}), "kind"),
        (json.dumps({"steps": [{"kind": "prune", "sparsity": 1.5}]}), "sparsity"),
        (json.dumps({"steps": [DYNAMIC, PRUNE]}), "quantize must be the last step"),
        (json.dumps({"steps": [{"kind": "prune", "method": "n:m", "n": 4, "m": 4}]}), "n < m"),
        (json.dumps({"steps": [SVD], "surprise": 1}), "surprise"),
        (json.dumps({"steps": [{"kind": "quantize", "mod": "static"}]}), "did you mean 'mode'?"),
        (json.dumps({"steps": [{"kind": "distill"}]}), "distill needs a prune or svd step before it"),
        (
            json.dumps({"steps": [{**DYNAMIC, "recovery_target": "float_outputs"}]}),
            "recovery_target applies to static quantization only; remove it or set mode to static",
        ),
        (
            json.dumps({"steps": [{**STATIC, "smoothing": "all"}]}),
            "smoothing applies to dynamic quantization only; remove it or set mode to dynamic",
        ),
    ],
    ids=[
        "not-json",
        "no-steps",
        "unknown-kind",
        "sparsity-out-of-range",
        "quantize-not-last",
        "n-not-below-m",
        "extra",
        "typo",
        "distill-without-prune",
        "static-field-in-dynamic-mode",
        "dynamic-field-in-static-mode",
    ],
)
def test_bad_plan_is_refused_with_invalid_plan(client: ServiceClient, plan: str, words: str) -> None:
    response = submit(client, mlp_bytes(), plan)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_plan"
    assert words in error["message"]


def test_missing_plan_is_refused(client: ServiceClient) -> None:
    response = submit(client, mlp_bytes(), None)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_plan" and "plan" in error["message"]


def test_missing_model_is_refused(client: ServiceClient) -> None:
    response = submit(client, None, plan_json(DYNAMIC))
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_request" and "model" in error["message"]


def test_empty_model_file_is_refused(client: ServiceClient) -> None:
    response = submit(client, b"", plan_json(DYNAMIC))
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_model" and "empty" in error["message"]


def test_static_quantization_without_calibration_is_refused_at_upload(client: ServiceClient) -> None:
    response = submit(client, mlp_bytes(), plan_json(STATIC))
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_plan" and "calibration" in error["message"]


def test_distill_without_calibration_is_refused_at_upload(client: ServiceClient) -> None:
    response = submit(client, mlp_bytes(), json.dumps({"steps": [PRUNE, {"kind": "distill"}]}))
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_plan" and error["message"].startswith("distill needs calibration data")


def test_unknown_form_field_and_duplicate_file_are_refused(client: ServiceClient) -> None:
    body = multipart([("plan", None, plan_json(DYNAMIC).encode()), ("model", "m.onnx", b"x"), ("extra", None, b"1")])
    response = client.post("/api/jobs", content=body, headers=MULTIPART)
    assert response.status_code == 422 and "extra" in error_of(response)["message"]
    body = multipart(
        [("plan", None, plan_json(DYNAMIC).encode()), ("model", "a.onnx", b"x"), ("model", "b.onnx", b"y")]
    )
    response = client.post("/api/jobs", content=body, headers=MULTIPART)
    assert response.status_code == 422 and "twice" in error_of(response)["message"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"plan": "{}"}}, 415, "unsupported_media_type"),
        ({"data": {"plan": "{}"}}, 415, "unsupported_media_type"),
        ({"content": b"--x\r\nnot a part", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400, None),
        ({"content": b"", "headers": {"Content-Type": "multipart/form-data"}}, 415, "unsupported_media_type"),
    ],
    ids=["json-body", "urlencoded-body", "malformed-multipart", "no-boundary"],
)
def test_body_that_is_not_a_multipart_form_is_refused(
    client: ServiceClient, kwargs: dict[str, Any], status: int, code: str | None
) -> None:
    response = client.post("/api/jobs", **kwargs)
    assert response.status_code == status, response.text
    error = error_of(response)
    if code:
        assert error["code"] == code


def test_model_over_the_cap_is_refused_with_413(client: ServiceClient) -> None:
    response = submit(client, b"\0" * (1 << 20) + b"!", plan_json(DYNAMIC))
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "upload_too_large" and "model" in error["message"] and "1 MB" in error["message"]


def test_model_over_the_cap_without_content_length_is_refused_with_413(client: ServiceClient) -> None:
    head, tail = multipart([("plan", None, plan_json(DYNAMIC).encode()), ("model", "big.onnx", b"@@")]).split(b"@@")

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(64):  # 4 MB in 64 KB chunks
            yield b"\0" * (64 << 10)
        yield tail

    response = client.post("/api/jobs", content=body(), headers=MULTIPART)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 413
    assert error_of(response)["code"] == "upload_too_large"


def test_refused_uploads_leave_no_job_folder_behind(client: ServiceClient) -> None:
    before = {j["id"] for j in client.get("/api/jobs").json()}
    submit(client, b"\0" * (2 << 20), plan_json(DYNAMIC))
    submit(client, mlp_bytes(), "{bad")
    assert {j["id"] for j in client.get("/api/jobs").json()} == before
    folders = {p.name for p in (client.data_dir / "jobs").iterdir()}
    assert folders == before


# ---------------------------------------------------------------- errors found by the job


def test_broken_model_bytes_fail_the_job_with_invalid_model(client: ServiceClient) -> None:
    job_id = submit_ok(client, b"this is not an ONNX model, just text renamed .onnx", plan_json(DYNAMIC))
    job, _ = wait_for_job(client, job_id)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "invalid_model", job["error"]
    assert job["error"]["message"]
    assert "report" not in job["links"]
    for result in ("report", "report.html", "model"):
        response = client.get(f"/api/jobs/{job_id}/{result}")
        assert response.status_code == 409
        error = error_of(response)
        assert error["code"] == "job_not_finished" and "failed" in error["message"]
    assert client.delete(f"/api/jobs/{job_id}").status_code == 204


def test_truncated_model_fails_the_job_with_invalid_model(client: ServiceClient) -> None:
    job_id = submit_ok(client, mlp_bytes()[:5000], plan_json(DYNAMIC))
    job, _ = wait_for_job(client, job_id)
    assert job["state"] == "failed" and job["error"]["code"] == "invalid_model", job["error"]


@pytest.mark.parametrize(
    ("calibration", "words"),
    [
        (npz_bytes(wrong=np.zeros((4, 64), np.float32)), "expects x"),
        (npz_bytes(x=np.zeros((4, 63), np.float32)), "x"),
        (b"PK\x03\x04 not really a zip", "npz"),
        (npz_bytes(x=np.full((4, 64), np.nan, np.float32)), "NaN"),
        (npz_bytes(x=np.array([object()], dtype=object)), "pickle"),
    ],
    ids=["wrong-input-name", "wrong-shape", "not-npz", "nan-values", "pickled-objects"],
)
def test_wrong_calibration_data_fails_the_job_with_invalid_data(
    client: ServiceClient, calibration: bytes, words: str
) -> None:
    job_id = submit_ok(client, mlp_bytes(), plan_json(STATIC), calibration=calibration)
    job, _ = wait_for_job(client, job_id)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "invalid_data", job["error"]
    assert words in job["error"]["message"]


# ---------------------------------------------------------------- unknown and malformed ids


@pytest.mark.parametrize(
    "job_id",
    [
        "0123456789abcdef0123456789abcdef",
        "0123456789ABCDEF0123456789ABCDEF",
        "0123456789abcdef0123456789abcde",
        "..",
        "...",
        "job.json",
        "..%2F..%2Fetc",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "0123456789abcdef0123456789abcdef%00",
        "0123456789abcdef0123456789abcdef%0A",
    ],
)
def test_unknown_or_malformed_job_id_is_404(client: ServiceClient, job_id: str) -> None:
    for method, suffix in [("GET", ""), ("GET", "/report"), ("GET", "/report.html"), ("GET", "/model"), ("DELETE", "")]:
        response = client.request(method, f"/api/jobs/{job_id}{suffix}")
        assert response.status_code == 404, (method, job_id, suffix, response.text)
        assert error_of(response)["code"] in ("job_not_found", "not_found")
        assert "root:" not in response.text


def test_traversal_through_unencoded_dots_does_not_escape(client: ServiceClient) -> None:
    response = client.get("/api/jobs/../../etc/passwd")
    assert response.status_code == 404
    assert "root:" not in response.text


def test_empty_unnamed_file_parts_from_a_browser_form_are_not_uploads(client: ServiceClient) -> None:

    body = multipart(
        [
            ("plan", None, plan_json(PRUNE).encode()),
            ("model", "m.onnx", mlp_bytes()),
            ("calibration", "", b""),
            ("evaluation", "", b""),
        ]
    )
    response = client.post("/api/jobs", content=body, headers=MULTIPART)
    assert response.status_code == 202, response.text
    assert response.json()["inputs"] == ["model"]


def test_an_auto_search_longer_than_a_job_may_run_is_refused_before_it_is_queued(tmp_path: Path) -> None:
    with running_service(make_settings(tmp_path / "data", job_timeout_s=600)) as client:
        plan = json.dumps({"steps": [{"kind": "auto", "time_budget_s": 900}]})
        response = submit(client, mlp_bytes(), plan)
        assert response.status_code == 422
        error = error_of(response)
        assert error["code"] == "invalid_plan" and "600 s" in error["message"] and "900 s" in error["message"]
        assert client.get("/api/jobs").json() == []  # nothing stored
