"""A job whose process is killed (time limit, memory limit, a crash, shutdown) leaves no upload behind.

The job's process deletes its upload itself once it has its own copy of the model and when it fails; a process
killed before that does neither, so the worker that reaps it deletes the upload. The jobs here run in the real
service and worker. A warm job process stopped (SIGSTOP) before it reads its job stays stopped however loaded
the host is: what happens to the job then does not depend on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from service import job_upload, worker
from service.jobs import JobState, JobStore

import models
from bundle_archives import external_mlp, tar_bundle, zip_bundle
from service_harness import (
    FAST,
    SLOW_PLAN,
    ServiceClient,
    job_processes,
    make_settings,
    running_service,
    submit_ok,
    wait_for_job,
    wait_until,
)

_PLAN = json.dumps({"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST})
# Set, so that a warm process (started before any job) has the limits of every job here and is handed it.
_LIMITS = {"job_memory_mb": 4096, "job_file_mb": 4096}


def _upload_left(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} & {"input.onnx", "model", "model.partial"}


def _stopped_warm_process() -> subprocess.Popen[bytes]:
    """The worker's warm job process, stopped before any job reaches it."""
    entries = wait_until(lambda: list(worker._standby), 60, "a warm job process")
    child = entries[0][1]
    os.kill(child.pid, signal.SIGSTOP)
    return child


def _handed_over(child: subprocess.Popen[bytes]) -> None:
    """Wait until the worker has written the job's folder to the warm process (which cannot read it)."""
    wait_until(lambda: child.stdin is None or child.stdin.closed, 60, "the job to reach the warm process")


@pytest.fixture
def stopped_service(tmp_path: Path) -> Iterator[tuple[ServiceClient, subprocess.Popen[bytes]]]:
    with running_service(make_settings(tmp_path / "data", job_timeout_s=1, **_LIMITS)) as client:
        yield client, _stopped_warm_process()


def test_a_job_past_its_time_limit_leaves_no_upload(stopped_service: tuple[ServiceClient, object]) -> None:
    client, _ = stopped_service
    job_id = submit_ok(client, zip_bundle(external_mlp()), _PLAN, model_name="net.zip")
    job, _ = wait_for_job(client, job_id, timeout=120)
    assert job["state"] == "failed" and job["error"]["code"] == "timeout", job
    folder = client.data_dir / "jobs" / job_id
    assert _upload_left(folder) == set()  # the archive was never opened: the worker deleted it
    assert "job.json" in {p.name for p in folder.iterdir()}
    assert client.get(f"/api/jobs/{job_id}").json()["error"]["code"] == "timeout"  # the record is intact


def test_a_job_process_dead_at_its_memory_limit_leaves_no_upload(tmp_path: Path) -> None:
    # Under a 1 MB address-space limit the job's process dies before it reads its job, of a MemoryError or an
    # ImportError (a library it cannot map), uncaught: it reports nothing. The warm one dies too, before it
    # takes the job; the worker then starts a fresh one, which dies the same way.
    with running_service(make_settings(tmp_path / "data", job_memory_mb=1)) as client:
        job_id = submit_ok(client, models.mlp().SerializeToString(), _PLAN)
        job, _ = wait_for_job(client, job_id, timeout=120)
        assert job["state"] == "failed" and job["error"]["code"] in ("out_of_memory", "crashed"), job["error"]
        assert _upload_left(client.data_dir / "jobs" / job_id) == set()


def test_a_job_interrupted_by_the_servers_shutdown_leaves_no_upload(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_service(make_settings(data, **_LIMITS)) as client:
        child = _stopped_warm_process()
        job_id = submit_ok(client, models.mlp().SerializeToString(), _PLAN)
        _handed_over(child)
        assert _upload_left(data / "jobs" / job_id) == {"input.onnx"}
    job = JobStore(data / "jobs").get(job_id)
    assert job.state == JobState.failed and job.error is not None and job.error.code == "interrupted", job
    assert _upload_left(data / "jobs" / job_id) == set()


def test_a_job_whose_warm_process_died_before_taking_it_still_has_its_upload(tmp_path: Path) -> None:
    # The one case where the worker runs a job again (in a fresh process): the upload must still be there.
    with running_service(make_settings(tmp_path / "data", **_LIMITS)) as client:
        child = _stopped_warm_process()
        job_id = submit_ok(client, zip_bundle(external_mlp()), _PLAN, model_name="net.zip")
        _handed_over(child)
        child.kill()  # a crash before it read the job (it never opened the job's log)
        job, _ = wait_for_job(client, job_id, timeout=120)
        assert job["state"] == "succeeded", job
        folder = client.data_dir / "jobs" / job_id
        assert _upload_left(folder) == set()
        assert {"output.onnx", "report.json", "report.html"} <= {p.name for p in folder.iterdir()}
        assert client.get(f"/api/jobs/{job_id}/model").status_code == 200


def test_half_unpacked_files_go_and_a_link_in_their_place_is_not_followed(tmp_path: Path) -> None:
    job = tmp_path / "job"
    (job / "model.partial" / "sub").mkdir(parents=True)
    (job / "model.partial" / "sub" / "net.onnx.data").write_bytes(b"half a bundle")
    elsewhere = tmp_path / "other-job"
    elsewhere.mkdir()
    (elsewhere / "kept").write_bytes(b"another job's file")
    (job / "model.partial" / "link").symlink_to(elsewhere, target_is_directory=True)
    (job / "report.json").write_bytes(b"{}")
    job_upload.drop_upload(job)
    assert sorted(p.name for p in job.iterdir()) == ["report.json"]
    (job / "model.partial").symlink_to(elsewhere, target_is_directory=True)
    job_upload.drop_upload(job)
    assert (elsewhere / "kept").read_bytes() == b"another job's file"


def _slow_bundle() -> bytes:
    """SLOW_PLAN's model as a tar bundle, its weights in a data file (about 6 MB)."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(
            models.mlp((512, 1024, 1024, 10)),
            Path(tmp, "net.onnx"),
            save_as_external_data=True,
            location="net.onnx.data",
        )
        return tar_bundle({p.name: p.read_bytes() for p in Path(tmp).iterdir()})


def test_a_job_killed_after_it_took_in_its_weights_leaves_none_of_them(tmp_path: Path) -> None:
    # SLOW_PLAN times the models for minutes: the job is killed while it measures, long after it has moved the
    # bundle's weights into its temp folder (or copied a single file's), which the job itself never cleans up then.
    with running_service(make_settings(tmp_path / "data", **_LIMITS)) as client:
        job_id = submit_ok(client, _slow_bundle(), SLOW_PLAN, model_name="slow.tar")
        folder = client.data_dir / "jobs" / job_id

        def measuring() -> list[int]:
            job = client.get(f"/api/jobs/{job_id}").json()
            assert job["state"] in ("queued", "running"), job
            return job_processes(folder) if str(job["stage"]).startswith("measuring") else []

        [pid] = wait_until(measuring, 120, f"job {job_id} to measure")
        assert list((folder / "tmp").rglob("original.onnx.data*"))  # the job's own model, its weights moved there
        os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer does
        job, _ = wait_for_job(client, job_id, timeout=120)
        assert job["state"] == "failed" and job["error"]["code"] == "crashed", job["error"]
        assert _upload_left(folder) == set() and not (folder / "tmp").exists()
        assert {"job.json", "job.log"} <= {p.name for p in folder.iterdir()}
