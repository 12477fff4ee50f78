"""A job whose result cannot be written: the file-size limit of its process, or a data dir on a full tmpfs.

Either way the job must end failed with code "disk_full", publish no result (not even half of one), leave no
temp file behind, and the service must keep running the next job.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings

import models
from service_harness import MULTIPART, TERMINAL, job_body, make_settings, plan_json, wait_until

pytestmark = pytest.mark.slow

KEEPS_SIZE = plan_json({"kind": "prune", "method": "unstructured", "sparsity": 0.3})  # zeros stay dense: same size
RESULTS = ("output.onnx", "report.json", "report.html")
# What a failed job's folder may hold: its record, inputs, logs, progress, the error and the process's tmp dir.
ALLOWED_AFTER_FAILURE = {"job.json", ".lock", "input.onnx", "job.log", "progress.json", "error.json", "tmp"}


def _big_model() -> bytes:
    """An MLP of about 2 MB (its pruned copy is as large)."""
    model = models.mlp((256, 1024, 256, 10)).SerializeToString()
    assert len(model) > 2_000_000
    return model


@contextlib.contextmanager
def _service(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, embedded_worker=True)) as client:
        yield client


def _submit(client: TestClient, model: bytes, plan: str) -> str:
    response = client.post("/api/jobs", content=job_body(model, plan), headers=MULTIPART)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _finished(client: TestClient, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def state() -> dict[str, Any] | None:
        response = client.get(f"/api/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body if body["state"] in TERMINAL else None

    return wait_until(state, timeout, f"job {job_id} to finish", poll=0.1)


def _assert_nothing_published(client: TestClient, folder: Path, job_id: str) -> None:
    names = {p.name for p in folder.iterdir()}
    assert names <= ALLOWED_AFTER_FAILURE, f"unexpected files in the failed job's folder: {names}"
    # The process's own tmp dir may keep small bookkeeping files (ONNX Runtime's), never a piece of a result.
    scratch = [p for p in (folder / "tmp").rglob("*") if p.is_file()]
    assert all(p.suffix != ".onnx" and p.stat().st_size < 64 << 10 for p in scratch), scratch
    for route in ("model", "report", "report.html"):
        response = client.get(f"/api/jobs/{job_id}/{route}")
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "job_not_finished"


def test_result_larger_than_the_file_size_limit_fails_the_job_with_disk_full_and_publishes_nothing(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path / "data", job_file_mb=1, threads_per_job=1)
    with _service(settings) as client:
        job_id = _submit(client, _big_model(), KEEPS_SIZE)
        job = _finished(client, job_id)
        assert job["state"] == "failed", job
        assert job["error"]["code"] == "disk_full", job["error"]
        assert str(settings.data_dir) not in job["error"]["message"]
        _assert_nothing_published(client, settings.jobs_dir / job_id, job_id)

        # Everything else is intact: the same service runs a job whose results fit.
        small = _submit(client, models.mlp().SerializeToString(), KEEPS_SIZE)
        assert _finished(client, small)["state"] == "succeeded"
        assert client.get(f"/api/jobs/{small}/model").status_code == 200
        listed = {j["id"]: j["state"] for j in client.get("/api/jobs").json()}
        assert listed == {job_id: "failed", small: "succeeded"}


@contextlib.contextmanager
def _tmpfs(mount_point: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of this size mounted here (needs root, or CAP_SYS_ADMIN); the test is skipped otherwise."""
    mount_point.mkdir()
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_data_dir_on_a_full_tmpfs_fails_the_job_with_disk_full_and_publishes_nothing(tmp_path: Path) -> None:
    model = _big_model()
    # Room for the queue, the upload and the logs, but not for a second copy of the model.
    size_kb = (len(model) >> 10) + 1024
    with _tmpfs(tmp_path / "small", size_kb) as mount_point:
        settings = make_settings(mount_point / "data", threads_per_job=1)
        with _service(settings) as client:
            job_id = _submit(client, model, KEEPS_SIZE)
            job = _finished(client, job_id)
            assert job["state"] == "failed", job
            assert job["error"]["code"] == "disk_full", job["error"]
            folder = settings.jobs_dir / job_id
            _assert_nothing_published(client, folder, job_id)

            # The failed write gave its space back, so a small job still fits and succeeds.
            small = _submit(client, models.mlp().SerializeToString(), KEEPS_SIZE)
            assert _finished(client, small)["state"] == "succeeded"
            assert client.get(f"/api/jobs/{job_id}").json()["state"] == "failed"


def test_a_write_failing_after_the_model_was_saved_removes_the_saved_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model is written first; if the report then hits a full disk, the model must not stay behind."""
    import argparse
    import errno
    import json

    import onnx_ops.html_report
    from service import job_process

    folder = tmp_path / "job"
    (folder / "tmp").mkdir(parents=True)
    (folder / "input.onnx").write_bytes(models.mlp().SerializeToString())
    (folder / "job.json").write_text(json.dumps({"plan": json.loads(KEEPS_SIZE)}))

    def full_disk(*_: object, **__: object) -> str:
        assert (folder / "output.onnx").exists()  # the failure really comes after the model was saved
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_ops.html_report, "render_html", full_disk)
    args = argparse.Namespace(
        threads=1, max_model_mb=64, max_data_mb=64, memory_mb=4096, file_mb=4096, external_data_mb=2048
    )
    assert job_process._run(folder, args) == job_process.EXIT_KNOWN_ERROR
    assert json.loads((folder / "error.json").read_bytes())["code"] == "disk_full"
    assert not any((folder / name).exists() for name in RESULTS)
