"""A job's process killed, out of time or out of memory fails that job with a clear reason; the rest goes on."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service_harness import (
    SLOW_PLAN,
    TERMINAL,
    ServiceClient,
    error_of,
    group_alive,
    job_processes,
    make_settings,
    mlp_bytes,
    plan_json,
    running_service,
    slow_model_bytes,
    submit_ok,
    wait_for_job,
    wait_until,
)

PRUNE = {"kind": "prune", "method": "unstructured", "sparsity": 0.5}

pytestmark = pytest.mark.slow


# What the job's process reports while it times both models (the stage this file's slow plan spends minutes in).
TIMING = "measuring: latency"


def _running_child(client: ServiceClient, job_id: str, stage: str | None = None) -> int:
    """The pid of the job's process once the job runs (and has reported a stage starting with `stage`, if given)."""
    folder = client.data_dir / "jobs" / job_id

    def found() -> int | None:
        job = client.get(f"/api/jobs/{job_id}").json()
        assert job["state"] in ("queued", "running"), job
        if stage is not None and not str(job["stage"]).startswith(stage):
            return None
        pids = job_processes(folder)
        return pids[0] if pids else None

    return int(wait_until(found, 60, f"the process of job {job_id} to run" + (f" {stage}" if stage else "")))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_a_signal_killing_the_job_process_fails_that_job_and_the_next_job_succeeds(
    settings_dir: Path, sig: signal.Signals
) -> None:
    with running_service(make_settings(settings_dir)) as client:
        slow = submit_ok(client, slow_model_bytes(), SLOW_PLAN, model_name="slow.onnx")
        after = submit_ok(client, mlp_bytes(), plan_json(PRUNE))
        pid = _running_child(client, slow, stage=TIMING)

        running = client.get(f"/api/jobs/{slow}").json()
        assert running["state"] == "running" and running["stage"].startswith(TIMING)
        assert 0.0 <= running["progress"] <= 1.0 and running["started_at"] is not None
        busy = client.delete(f"/api/jobs/{slow}")
        assert busy.status_code == 409 and error_of(busy)["code"] == "job_running"
        early = client.get(f"/api/jobs/{slow}/report")
        assert early.status_code == 409 and error_of(early)["code"] == "job_not_finished"
        assert "running" in error_of(early)["message"]

        os.kill(pid, sig)  # SIGSEGV: as if onnx or ONNX Runtime crashed on the model
        job, _ = wait_for_job(client, slow)
        assert job["state"] == "failed"
        assert job["error"]["code"] == "crashed"
        assert sig.name in job["error"]["message"]
        assert client.get(f"/api/jobs/{slow}/model").status_code == 409

        job, _ = wait_for_job(client, after)
        assert job["state"] == "succeeded", job["error"]
        assert client.get("/healthz").status_code == 200
        assert client.delete(f"/api/jobs/{slow}").status_code == 204


def test_job_past_its_deadline_fails_with_timeout_and_its_process_group_is_gone(settings_dir: Path) -> None:
    # Nothing here waits to see the job running: on a loaded host its 5 s may be over before a poll sees it.
    with running_service(make_settings(settings_dir, job_timeout_s=5)) as client:
        slow = submit_ok(client, slow_model_bytes(), SLOW_PLAN)
        after = submit_ok(client, mlp_bytes(), plan_json(PRUNE))
        folder = client.data_dir / "jobs" / slow
        groups: set[int] = set()  # the job's process groups, when a poll catches the job running

        def finished() -> dict[str, Any] | None:
            for pid in job_processes(folder):
                with contextlib.suppress(ProcessLookupError):
                    groups.add(os.getpgid(pid))
            job = client.get(f"/api/jobs/{slow}").json()
            return job if job["state"] in TERMINAL else None

        job = wait_until(finished, 120, f"job {slow} to end")
        assert job["state"] == "failed" and job["started_at"] is not None
        assert job["error"] == {"code": "timeout", "message": "the job ran longer than its 5 s limit"}
        # Whatever the job's process started ran in its folder too: nothing at all is left working there.
        assert _working_in(folder) == []
        assert not any(group_alive(group) for group in groups)
        assert all(group not in (os.getpgrp(), 0) for group in groups)  # its own group, killed as a whole

        # The worker goes on with the next job. Its 5 s hold on an idle host, not always on a loaded one: it may
        # end by its own deadline too, but it runs and ends.
        job, _ = wait_for_job(client, after, timeout=120)
        assert job["started_at"] is not None and job["finished_at"] is not None
        assert job["state"] == "succeeded" or job["error"]["code"] == "timeout", job["error"]


def test_memory_limit_too_small_for_the_job_fails_it_with_out_of_memory(settings_dir: Path) -> None:
    with running_service(make_settings(settings_dir, job_memory_mb=256)) as client:
        job_id = submit_ok(client, mlp_bytes(), plan_json(PRUNE))
        job, _ = wait_for_job(client, job_id)
        assert job["state"] == "failed"
        assert job["error"]["code"] == "out_of_memory", job["error"]
        assert "256 MB" in job["error"]["message"]
        assert client.get("/healthz").status_code == 200


def _memory_bomb() -> bytes:
    """x @ W, then Tile to [N, 64 * 8,000,000] floats: 2 GB per sample at run time, nothing at load time."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm"),
        helper.make_node("Tile", ["xw", "reps"], ["big"], name="tile"),
        helper.make_node("ReduceSum", ["big"], ["y"], name="sum", keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bomb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [
            numpy_helper.from_array(np.ones((64, 64), np.float32), "W"),
            numpy_helper.from_array(np.array([1, 8_000_000], np.int64), "reps"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def test_model_that_allocates_past_the_memory_limit_fails_only_its_job(settings_dir: Path) -> None:
    # Two ONNX Runtime threads: on a many-core host each thread's stack would eat into the 1200 MB address space.
    with running_service(make_settings(settings_dir, job_memory_mb=1200, threads_per_job=2)) as client:
        bomb = submit_ok(client, _memory_bomb(), plan_json({**PRUNE, "min_elements": 0}))
        after = submit_ok(client, mlp_bytes(), plan_json(PRUNE))

        job, _ = wait_for_job(client, bomb)
        assert job["state"] == "failed"
        error = job["error"]
        # ONNX Runtime reports the failed allocation (onnx_ops turns it into out_of_memory); an allocator
        # that aborts instead would end as crashed. Either way the reason is stated.
        assert error["code"] in ("out_of_memory", "crashed"), error
        assert "memory" in error["message"] or "SIG" in error["message"], error

        job, _ = wait_for_job(client, after)
        assert job["state"] == "succeeded", job["error"]


def _working_in(folder: Path) -> list[int]:
    """Pids of live processes (not zombies) whose working directory or command line is the job's folder."""
    folder = folder.resolve()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = Path(os.readlink(entry / "cwd"))
            args = (entry / "cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if state != "Z" and (cwd == folder or folder in cwd.parents or str(folder).encode() in args):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def settings_dir(tmp_path: Path) -> Path:
    """A data directory for one test's app."""
    return tmp_path / "data"
