"""Job records, the queue and the worker: restarts lose nothing, nothing stays stuck, old jobs go away."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import service.jobs
from service.jobs import JobError, JobNotFoundError, JobState, JobStore
from service.settings import Settings

from service_harness import (
    SLOW_PLAN,
    error_of,
    job_processes,
    make_settings,
    mlp_bytes,
    plan_json,
    running_service,
    slow_model_bytes,
    submit,
    submit_ok,
    wait_for_job,
    wait_until,
)

DYNAMIC = {"kind": "quantize", "mode": "dynamic"}
PRUNE = {"kind": "prune", "method": "unstructured", "sparsity": 0.5}


def test_queued_jobs_run_after_a_restart(settings: Settings) -> None:
    with running_service(settings, embedded_worker=False) as client:
        ids = [submit_ok(client, mlp_bytes(), plan_json(step)) for step in (DYNAMIC, PRUNE)]
        for job_id in ids:
            job = client.get(f"/api/jobs/{job_id}").json()
            assert job["state"] == "queued" and job["stage"] is None and job["progress"] == 0.0
            early = client.get(f"/api/jobs/{job_id}/report")
            assert early.status_code == 409 and error_of(early)["code"] == "job_not_finished"
            assert "queued" in error_of(early)["message"]
        assert client.get("/healthz").json()["queued"] == 2
    with running_service(settings) as client:
        for job_id in ids:
            job, _ = wait_for_job(client, job_id)
            assert job["state"] == "succeeded", job["error"]
            assert job["started_at"] >= job["created_at"]


def test_queued_job_the_queue_lost_is_enqueued_again_on_restart(settings: Settings) -> None:
    with running_service(settings, embedded_worker=False) as client:
        job_id = submit_ok(client, mlp_bytes(), plan_json(DYNAMIC))
    (settings.data_dir / "queue.db").unlink()
    with running_service(settings) as client:
        job, _ = wait_for_job(client, job_id)
        assert job["state"] == "succeeded", job["error"]


def test_running_job_with_a_stale_heartbeat_fails_as_interrupted_on_restart(settings: Settings) -> None:
    with running_service(settings, embedded_worker=False) as client:
        stale = submit_ok(client, mlp_bytes(), plan_json(DYNAMIC))
        fresh = submit_ok(client, mlp_bytes(), plan_json(DYNAMIC))
    store = JobStore(settings.jobs_dir)
    # As a worker that died an hour ago left it: claimed, then no heartbeat.
    store.claim(stale, "gone-host:1")
    store.update(stale, heartbeat_at=time.time() - 3600)
    with running_service(settings) as client:
        job = client.get(f"/api/jobs/{stale}").json()
        assert job["state"] == "failed"
        assert job["error"]["code"] == "interrupted" and "worker stopped" in job["error"]["message"]
        job, _ = wait_for_job(client, fresh)
        assert job["state"] == "succeeded", job["error"]


@pytest.mark.slow
def test_stopping_the_server_ends_the_running_job_as_interrupted_and_keeps_queued_ones(settings: Settings) -> None:
    with running_service(settings) as client:
        slow = submit_ok(client, slow_model_bytes(), SLOW_PLAN)
        queued = submit_ok(client, mlp_bytes(), plan_json(DYNAMIC))
        folder = settings.jobs_dir / slow
        wait_until(lambda: job_processes(folder), 60, "the slow job's process")
    # The lifespan has ended: the job's process is gone and its record says why.
    assert job_processes(folder) == []
    store = JobStore(settings.jobs_dir)
    job = store.get(slow)
    assert job.state == JobState.failed and job.error is not None
    assert job.error.code == "interrupted" and "server stopped" in job.error.message
    assert store.get(queued).state == JobState.queued
    with running_service(settings) as client:
        job_out, _ = wait_for_job(client, queued)
        assert job_out["state"] == "succeeded", job_out["error"]
        assert client.get(f"/api/jobs/{slow}").json()["state"] == "failed"


@pytest.mark.slow
def test_jobs_submitted_together_all_succeed(tmp_path: Path) -> None:
    with running_service(make_settings(tmp_path / "data", workers=2)) as client:
        steps = [PRUNE, DYNAMIC, {"kind": "svd", "rank": 8}, {"kind": "prune", "method": "n:m"}, DYNAMIC]
        ids = [submit_ok(client, mlp_bytes(), plan_json(step)) for step in steps]
        assert len(set(ids)) == len(ids)
        for job_id in ids:
            job, _ = wait_for_job(client, job_id, timeout=120)
            assert job["state"] == "succeeded", job["error"]
        assert {j["state"] for j in client.get("/api/jobs").json()} == {"succeeded"}


def test_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    with running_service(make_settings(tmp_path / "data", max_queued_jobs=1), embedded_worker=False) as client:
        submit_ok(client, mlp_bytes(), plan_json(DYNAMIC))
        response = submit(client, mlp_bytes(), plan_json(DYNAMIC))
        assert response.status_code == 503 and response.headers["retry-after"]
        assert error_of(response)["code"] == "busy"


def test_low_disk_space_answers_507(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", min_free_disk_mb=1 << 40)
    with running_service(settings, embedded_worker=False) as client:
        response = submit(client, mlp_bytes(), plan_json(DYNAMIC))
        assert response.status_code == 507 and error_of(response)["code"] == "insufficient_storage"
        assert list(settings.jobs_dir.iterdir()) == []


# ---------------------------------------------------------------- the job store


def _store_with_jobs(root: Path, count: int) -> tuple[JobStore, list[str]]:
    store = JobStore(root)
    ids = []
    for _ in range(count):
        job_id, _folder = store.reserve()
        store.create(job_id, {"steps": [DYNAMIC]}, "m.onnx", ["model"])
        ids.append(job_id)
    return store, ids


def test_job_ids_are_checked_before_any_path_is_built(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    for bad in ("..", "../x", "a" * 31, "A" * 32, "g" * 32, "/" + "a" * 31, "a" * 32 + "\n", "", None):
        with pytest.raises(JobNotFoundError):
            store.path(bad)  # type: ignore[arg-type]
    with pytest.raises(JobNotFoundError):
        store.get("0" * 32)


def test_a_queued_job_is_claimed_once(tmp_path: Path) -> None:
    store, (job_id,) = _store_with_jobs(tmp_path, 1)
    first = store.claim(job_id, "w1")
    assert first is not None and first.state == JobState.running and first.attempts == 1 and first.worker == "w1"
    assert store.claim(job_id, "w2") is None
    assert store.claim("0" * 32, "w2") is None
    done = store.finish(job_id, JobError(code="x", message="y"))
    assert done.state == JobState.failed and done.finished_at is not None


def test_job_record_is_replaced_atomically_leaving_no_temp_files(tmp_path: Path) -> None:
    store, (job_id,) = _store_with_jobs(tmp_path, 1)
    for i in range(20):
        store.update(job_id, attempts=i)
    assert store.get(job_id).attempts == 19
    assert sorted(p.name for p in store.path(job_id).iterdir()) == [".lock", "job.json"]


def test_purge_removes_old_finished_jobs_and_orphans_and_keeps_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    store, (old_ok, old_failed, old_running, old_queued, recent_ok) = _store_with_jobs(tmp_path, 5)
    monkeypatch.setattr(service.jobs, "time", SimpleNamespace(time=lambda: now - 10 * 3600))
    store.update(old_ok, state=JobState.succeeded)
    store.update(old_failed, state=JobState.failed)
    store.update(old_running, state=JobState.running)
    store.update(old_queued, state=JobState.queued)
    monkeypatch.undo()
    store.update(recent_ok, state=JobState.succeeded)
    orphan, orphan_folder = store.reserve()  # an upload that never became a job
    os.utime(orphan_folder, (now - 10 * 3600, now - 10 * 3600))
    _new_orphan, new_orphan_folder = store.reserve()  # one in progress
    (tmp_path / "not-a-job").mkdir()

    assert store.purge(older_than_s=3600) == 3
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {old_running, old_queued, recent_ok, new_orphan_folder.name, "not-a-job"}
    assert orphan not in left


def test_recover_fails_only_stale_running_jobs_and_returns_queued_ones(tmp_path: Path) -> None:
    store, (stale, beating, queued, done) = _store_with_jobs(tmp_path, 4)
    for job_id in (stale, beating, done):
        store.claim(job_id, "w")
    store.update(stale, heartbeat_at=time.time() - 100)
    store.finish(done, None)
    assert store.recover(stale_after=10) == [queued]
    assert store.get(stale).state == JobState.failed
    assert store.get(stale).error == JobError(
        code="interrupted", message="the worker stopped while the job was running"
    )
    assert store.get(beating).state == JobState.running
    assert store.get(done).state == JobState.succeeded


def test_list_skips_folders_without_a_record(tmp_path: Path) -> None:
    store, ids = _store_with_jobs(tmp_path, 2)
    store.reserve()
    assert sorted(j.id for j in store.list()) == sorted(ids)
    store.delete(ids[0])
    assert [j.id for j in store.list()] == [ids[1]]
    with pytest.raises(JobNotFoundError):
        store.delete(ids[0])


def test_running_job_of_a_dead_local_worker_is_interrupted_at_once(tmp_path: Path) -> None:
    from service.worker import worker_is_dead

    store = JobStore(tmp_path / "jobs")
    job_id, _ = store.reserve()
    store.create(job_id, {"steps": []}, "m.onnx", ["model"])
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{socket.gethostname()}:{gone.stdout.strip()}"
    assert store.claim(job_id, dead) is not None
    # The heartbeat is fresh, but the worker process of this host is gone: no need to wait for staleness.
    store.recover(stale_after=3600, is_dead=worker_is_dead)
    job = store.get(job_id)
    assert job.state == JobState.failed and job.error is not None and job.error.code == "interrupted"


def test_running_job_of_a_live_or_remote_worker_is_left_alone(tmp_path: Path) -> None:
    from service.worker import worker_is_dead, worker_name

    store = JobStore(tmp_path / "jobs")
    ids = []
    for worker in (worker_name(), "another-host:1"):
        job_id, _ = store.reserve()
        store.create(job_id, {"steps": []}, "m.onnx", ["model"])
        store.claim(job_id, worker)
        ids.append(job_id)
    store.recover(stale_after=3600, is_dead=worker_is_dead)
    assert [store.get(i).state for i in ids] == [JobState.running, JobState.running]


def _standby_pids() -> list[int]:
    """Warm job processes started by this (test) process."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] if args else "Z"
        except OSError:
            continue
        if b"--standby" in args and str(os.getpid()).encode() in args and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_a_job_runs_in_a_process_warmed_up_before_it_arrived_and_none_outlives_the_server(tmp_path: Path) -> None:
    with running_service(make_settings(tmp_path / "data")) as client:
        [warm] = wait_until(_standby_pids, 30, "a warm job process")
        job_id = submit_ok(client, mlp_bytes(), plan_json(PRUNE))
        job, _ = wait_for_job(client, job_id)
        assert job["state"] == "succeeded", job["error"]
        # The warm process ran this one job, logged into the job's folder and ended; another one waits.
        assert wait_until(lambda: warm not in _standby_pids() and _standby_pids(), 30, "a new warm process")
        assert (client.data_dir / "jobs" / job_id / "job.log").exists()
        assert not list((client.data_dir / "jobs" / job_id / "tmp").glob("*.onnx"))
    assert wait_until(lambda: _standby_pids() == [], 10, "the warm processes to end with the server")


def test_a_warm_process_is_used_only_with_the_settings_it_was_started_with(tmp_path: Path) -> None:
    with running_service(make_settings(tmp_path / "a")):
        wait_until(_standby_pids, 30, "a warm job process")
    # A second service in the same process with a small memory limit: its jobs run under that limit.
    with running_service(make_settings(tmp_path / "b", job_memory_mb=256)) as client:
        job_id = submit_ok(client, mlp_bytes(), plan_json(PRUNE))
        job, _ = wait_for_job(client, job_id)
        assert job["state"] == "failed" and job["error"]["code"] == "out_of_memory", job


def test_a_warm_process_that_dies_before_taking_the_job_does_not_fail_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.worker

    handed: list[int] = []

    def dying_standby(settings: Settings, folder: Path, limits: tuple[int, int]) -> subprocess.Popen[bytes]:
        # What a warm process whose warm-up failed looks like: it ends with status 1 before it opens the log.
        child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        handed.append(child.pid)
        return child

    monkeypatch.setattr(service.worker, "_hand_to_standby", dying_standby)
    with running_service(make_settings(tmp_path / "data")) as client:
        job_id = submit_ok(client, mlp_bytes(), plan_json(PRUNE))
        job, _ = wait_for_job(client, job_id)
        assert handed and job["state"] == "succeeded", job["error"]


def test_a_job_process_that_died_of_an_allocation_failure_it_could_not_report_is_out_of_memory(
    tmp_path: Path,
) -> None:
    from service.worker import _outcome

    (tmp_path / "job.log").write_bytes(b"Traceback (most recent call last):\n  ...\nMemoryError\n")
    error = _outcome(1, tmp_path, 256)
    assert error is not None and error.code == "out_of_memory" and "256 MB" in error.message
    (tmp_path / "job.log").write_bytes(b"Traceback (most recent call last):\n  ...\nKeyError: 'x'\n")
    error = _outcome(1, tmp_path, 256)
    assert error is not None and error.code == "crashed"


def test_a_record_rewritten_while_it_is_read_is_never_reported_missing(tmp_path: Path) -> None:
    # os.replace leaves a reader that opened the old record holding a file with no link left: that is the
    # previous version, not a planted file. Refusing it made jobs vanish (404) in the middle of a poll.
    store = JobStore(tmp_path)
    job_id, _ = store.reserve()
    store.create(job_id, {"steps": []}, "m.onnx", ["model"])
    stop = threading.Event()

    def rewrite() -> None:
        while not stop.is_set():
            store.update(job_id, stage="writing")

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        reads, end = 0, time.monotonic() + 2.0
        while time.monotonic() < end:
            assert store.get(job_id).id == job_id
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert reads > 0
