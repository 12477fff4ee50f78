"""What the service stores and serves about a job stays bounded and its own, whatever was uploaded.

Two classes of the security review:
- strings from an upload (an op domain, node and tensor names) are cut wherever they are stored or shown:
  a job record stays a few KB, a report stays under its bound however many long names the model has;
- the API serves a job's files only as the plain files of its folder (a link planted by a compromised job
  process is refused, not followed), and the job folder is private (folders 0700, files 0600).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.report import MAX_REPORT_BYTES
from service.job_view import fmt_bytes
from service.jobs import MAX_MESSAGE_CHARS, JobStore

from corpus import FAST, Request, body, form, multipart_headers, valid_request
from hostile_harness import (
    Service,
    check_no_server_path,
    check_nothing_outside_job_folders,
    hostile_service_fixture,  # noqa: F401 - the module fixture "hostile_service"
)
from service_harness import error_of, wait_for_job

JOB_WAIT_S = 60.0
RECORD_BOUND = 8 << 10  # a job.json, whatever the upload: the plan, a few short fields and a bounded error


def _send(client: Any, request: Request) -> Any:
    assert isinstance(request.body, bytes)
    return client.request(request.method, request.path, content=request.body, headers=request.headers)


def _run(service: Service, request: Request) -> tuple[str, dict[str, Any]]:
    response = _send(service.client, request)
    assert response.status_code == 202, response.text[:500]
    job_id = str(response.json()["id"])
    job, seen = wait_for_job(service.client, job_id, timeout=JOB_WAIT_S)
    for answer in seen:
        check_no_server_path(service, str(answer)[:100_000])
    return job_id, job


def _folder(service: Service, job_id: str) -> Path:
    return service.root / "data" / "jobs" / job_id


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], domains: dict[str, int]) -> bytes:
    graph = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains.items()])
    model.ir_version = 8
    return model.SerializeToString()


def huge_node_domain() -> bytes:
    """A node whose operator domain is 0.9 MB of control characters (repr() makes it four times longer)."""
    domain = "\x01" * 900_000
    node = helper.make_node("Relu", ["x"], ["y"], domain=domain)
    return _model([node], [], {"": 17, domain: 1})


def huge_node_name() -> bytes:
    """A node of an unknown domain, named with 1.5 MB."""
    node = helper.make_node("Relu", ["x"], ["y"], name="n" * 1_500_000, domain="com.example")
    return _model([node], [], {"": 17})


def huge_input_name() -> bytes:
    """A sequence input (not supported: the plan is refused naming it), named with 0.9 MB."""
    name = "s" * 900_000
    node = helper.make_node("SequenceLength", [name], ["y"])
    graph = helper.make_graph(
        [node],
        "hostile",
        [helper.make_tensor_sequence_value_info(name, TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def many_long_names(layers: int = 250, chars: int = 1500) -> bytes:
    """A chain of MatMuls whose node, weight and tensor names are `chars` long (about 1.9 MB)."""
    nodes, inits, previous = [], [], "x"
    for i in range(layers):
        tag = f"{i:05d}"
        weight, out = tag + "w" * (chars - 5), ("y" if i == layers - 1 else tag + "t" * (chars - 5))
        inits.append(numpy_helper.from_array(np.arange(1, 17, dtype=np.float32).reshape(4, 4) / 16, weight))
        nodes.append(helper.make_node("MatMul", [previous, weight], [out], name=tag + "n" * (chars - 5)))
        previous = out
    return _model(nodes, inits, {"": 17})


# 15 prune steps, each reaching a higher sparsity: every step records every layer by its names.
MANY_STEPS = json.dumps(
    {
        "steps": [
            {"kind": "prune", "method": "unstructured", "sparsity": k / 16, "min_elements": 0} for k in range(1, 16)
        ],
        "evaluation": FAST,
    }
)


@pytest.mark.parametrize(
    ("build", "code"),
    [(huge_node_domain, "invalid_model"), (huge_node_name, "invalid_model"), (huge_input_name, "invalid_plan")],
    ids=["op domain", "node name", "input name"],
)
def test_job_record_stays_small_whatever_the_model_names(hostile_service: Service, build: Any, code: str) -> None:
    service = hostile_service
    job_id, job = _run(service, form(build()))
    assert job["state"] == "failed" and job["error"]["code"] == code, job["error"]
    assert 0 < len(job["error"]["message"]) <= MAX_MESSAGE_CHARS
    record = _folder(service, job_id) / "job.json"
    assert record.stat().st_size < RECORD_BOUND, f"job.json has {record.stat().st_size} bytes"
    listing = service.client.get("/api/jobs")
    assert listing.status_code == 200
    assert len(listing.content) < RECORD_BOUND * len(listing.json())
    page = service.client.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and len(page.content) < 200_000
    check_nothing_outside_job_folders(service)


def test_listing_skips_a_record_past_its_size_cap(hostile_service: Service) -> None:
    """A job.json the server did not write (too large) is left out of the list, not parsed."""
    service = hostile_service
    job_id, _ = _run(service, valid_request())
    record = _folder(service, job_id) / "job.json"
    job = json.loads(record.read_bytes())
    job["error"] = {"code": "x", "message": "m" * (2 << 20)}
    record.write_text(json.dumps(job))
    listing = service.client.get("/api/jobs")
    assert listing.status_code == 200
    assert job_id not in {j["id"] for j in listing.json()}
    assert len(listing.content) < 1 << 20
    assert service.client.get(f"/api/jobs/{job_id}").status_code == 404


def test_report_stays_bounded_for_many_long_names(hostile_service: Service) -> None:
    service = hostile_service
    job_id, job = _run(
        service,
        Request(
            body([(b"plan", None, MANY_STEPS.encode()), (b"model", b"m.onnx", many_long_names())]), multipart_headers()
        ),
    )
    assert job["state"] == "succeeded", job["error"]
    folder = _folder(service, job_id)
    assert (folder / "report.json").stat().st_size <= MAX_REPORT_BYTES * 1.1
    assert (folder / "report.html").stat().st_size <= 3 * MAX_REPORT_BYTES
    report = service.client.get(f"/api/jobs/{job_id}/report")
    assert report.status_code == 200 and len(report.content) <= MAX_REPORT_BYTES * 1.1
    data = report.json()
    assert len(data["steps"]) == 15
    assert any("of 250" in w for w in data["warnings"]), "the report does not say what it cut"
    for step in data["steps"]:
        for layer in step["layers"]:
            assert len(layer["name"]) < 1500 and len(layer["weight"]) < 1500
    assert service.client.get(f"/api/jobs/{job_id}/report.html").status_code == 200
    assert service.client.get(f"/jobs/{job_id}").status_code == 200


def _plant(path: Path, kind: str, target: Path) -> None:
    path.unlink()
    if kind == "symlink":
        path.symlink_to(target)
    else:
        os.link(target, path)


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
def test_links_planted_in_a_job_folder_are_not_followed(hostile_service: Service, kind: str) -> None:
    """A compromised job process swaps its results for links to a file of the server's user: it is refused."""
    service = hostile_service
    job_id, job = _run(service, valid_request())
    assert job["state"] == "succeeded", job["error"]
    folder = _folder(service, job_id)
    secret = service.root / f"secret-{kind.replace(' ', '-')}.txt"
    secret.write_text('{"secret": "the server user\'s file"}')
    service.baseline[secret.name] = (secret.stat().st_mtime_ns, secret.stat().st_size, secret.read_bytes())
    try:
        for name, route in (
            ("output.onnx", "model"),
            ("report.json", "report"),
            ("report.html", "report.html"),
        ):
            _plant(folder / name, kind, secret)
            response = service.client.get(f"/api/jobs/{job_id}/{route}")
            assert b"secret" not in response.content, f"{route} served the linked file"
            assert response.status_code in (404, 409) and error_of(response)["code"], response.text[:300]
        page = service.client.get(f"/jobs/{job_id}")
        assert page.status_code == 200 and b"server user" not in page.content
        sizes = service.root / f"sizes-{kind.replace(' ', '-')}.json"  # what the jobs list would show from it
        sizes.write_text(json.dumps({"before": {"size_bytes": 987654321}, "after": {"size_bytes": 123456789}}))
        service.baseline[sizes.name] = (sizes.stat().st_mtime_ns, sizes.stat().st_size, sizes.read_bytes())
        _plant(folder / "report.json", kind, sizes)
        listing = service.client.get("/")
        assert listing.status_code == 200 and fmt_bytes(987654321).encode() not in listing.content
        if kind == "symlink":  # the record's lock: no file may be created or locked through it
            (folder / ".lock").unlink(missing_ok=True)
            (folder / ".lock").symlink_to(service.root / "created-through-the-lock")
            JobStore(folder.parent).update(job_id, attempts=2)
            assert not (service.root / "created-through-the-lock").exists()
        _plant(folder / "job.json", kind, secret)
        assert service.client.get(f"/api/jobs/{job_id}").status_code == 404
    finally:
        for name in ("output.onnx", "report.json", "report.html", "job.json"):
            (folder / name).unlink(missing_ok=True)
    check_nothing_outside_job_folders(service)


def test_a_job_folder_swapped_for_a_link_is_not_followed(hostile_service: Service) -> None:
    service = hostile_service
    job_id, job = _run(service, valid_request())
    assert job["state"] == "succeeded", job["error"]
    folder = _folder(service, job_id)
    elsewhere = service.root / "elsewhere"
    folder.rename(elsewhere)
    folder.symlink_to(elsewhere, target_is_directory=True)
    try:
        for route in ("", "/model", "/report", "/report.html"):
            assert service.client.get(f"/api/jobs/{job_id}{route}").status_code == 404, route
    finally:
        folder.unlink()
        elsewhere.rename(folder)


def test_job_files_are_private(hostile_service: Service) -> None:
    service = hostile_service
    job_id, job = _run(service, valid_request())
    assert job["state"] == "succeeded", job["error"]
    folder = _folder(service, job_id)
    found = [folder, *folder.rglob("*")]
    names = {p.name for p in found}
    assert {"job.json", "output.onnx", "report.json", "report.html", "job.log"} <= names  # the upload is gone
    for path in found:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        assert mode == want, f"{path.relative_to(folder.parent)} is {oct(mode)}, expected {oct(want)}"
