"""Scale-out as docker-compose runs it: a real redis-server, the API without a worker, and separate worker
processes sharing one data directory. Needs Debian's redis-server (CI installs it); skipped without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import models
from service_harness import job_processes, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.scaleout]
REDIS = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HANG_S = 300  # every wait here bounds a hang, not a duration (CI shares 2 loaded cores)


def _warm_child(worker: subprocess.Popen[bytes]) -> bool:
    """True once this worker process has started its warm job process."""
    pattern = f"service.job_process --standby --parent-pid {worker.pid} "
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True)
    return bool(found.stdout.strip())


def _wait_until(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


_CLI = [sys.executable, "-m", "onnx_ops.cli"]


class Stack:
    """redis-server, `onnx-compress serve --no-worker` and N `onnx-compress worker` processes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.data = tmp, tmp / "data"
        self.redis_port, self.api_port = _free_port(), _free_port()
        self.env = {
            **os.environ,
            "COMPRESS_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "COMPRESS_DATA_DIR": str(self.data),
            # A job is reaped after 4 heartbeats without a beat; with 1 s a loaded host reaped live jobs. A killed
            # worker of this host is found by its pid, whatever the heartbeat.
            "COMPRESS_HEARTBEAT_S": "15",
            "COMPRESS_THREADS_PER_JOB": "1",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []

    def _start(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start(self, workers: int) -> None:
        self._start(
            [
                REDIS or "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            "redis",
        )
        self._start([*_CLI, "serve", "--no-worker", "--port", str(self.api_port)], "api")
        self.add_workers(workers)
        _wait_until(lambda: self._healthy(), HANG_S, "the API")

    def add_workers(self, count: int) -> None:
        """Start `count` more workers and wait until each is ready to take a job."""
        for _ in range(count):
            self.workers.append(self._start([*_CLI, "worker"], f"worker{len(self.procs)}"))
        # A worker warms up a job process just before it starts consuming: once every worker has one, a batch
        # submitted now is spread over all of them (a worker still importing on a loaded host would miss it).
        _wait_until(lambda: all(map(_warm_child, self.workers)), HANG_S, "every worker's warm job process")

    def kill_worker(self, pid: int) -> None:
        """SIGKILL the whole worker process `pid`, and reap it as the container runtime (or init) would.

        An unreaped child stays a zombie, which looks alive to the other workers' check by pid.
        """
        (worker,) = [w for w in self.workers if w.pid == pid]
        worker.kill()
        worker.wait(timeout=HANG_S)
        self.workers.remove(worker)

    def _healthy(self) -> bool:
        try:
            return self.get("/healthz")["status"] == "ok"
        except (urllib.error.URLError, ConnectionError):
            return False

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def submit(self, model: bytes, plan: dict) -> str:
        boundary = uuid.uuid4().hex
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="plan"\r\n\r\n{json.dumps(plan)}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n\r\n'
        ).encode()
        body += model + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/api/jobs",
            data=body,
            method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 202
            return str(json.loads(r.read())["id"])

    def job(self, job_id: str) -> dict:
        return self.get(f"/api/jobs/{job_id}")

    def finished(self, job_id: str, timeout: float = HANG_S) -> dict:
        return _wait_until(
            lambda: (j := self.job(job_id))["state"] in ("succeeded", "failed") and j, timeout, f"job {job_id}"
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack for this module's tests: starting three Python services costs more than most of the tests."""
    if REDIS is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    stack = Stack(tmp_path_factory.mktemp("stack"))
    try:
        stack.start(workers=2)
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def stack(running_stack: Stack) -> Stack:
    """The shared stack with two live, ready workers (a worker killed by an earlier test is replaced)."""
    running_stack.add_workers(2 - len(running_stack.workers))
    return running_stack


# latency_seconds 0: 20 timed pairs, not up to 10 s of timing per job until the latency interval narrows.
FAST = {
    "steps": [{"kind": "prune", "sparsity": 0.5}],
    "evaluation": {"latency_runs": 20, "warmup_runs": 2, "latency_seconds": 0.0},
}


def test_batch_of_jobs_is_spread_over_workers_and_all_succeed(stack: Stack) -> None:
    model = models.mlp().SerializeToString()
    ids = [stack.submit(model, FAST) for _ in range(10)]
    jobs = [stack.finished(i) for i in ids]
    assert [j["state"] for j in jobs] == ["succeeded"] * 10, [j["error"] for j in jobs]
    workers = {json.loads((stack.data / "jobs" / i / "job.json").read_text())["worker"] for i in ids}
    assert len(workers) >= 2, workers
    report = stack.get(f"/api/jobs/{ids[0]}/report")
    assert report["after"]["zero_fraction"] > 0.3


def _slow_model() -> bytes:
    big = models.mlp(sizes=(1024, 2048, 2048, 10))
    return big.SerializeToString()


def test_worker_killed_mid_job_fails_that_job_only(stack: Stack) -> None:
    slow = {"steps": [{"kind": "prune", "sparsity": 0.5}], "evaluation": {"latency_runs": 5000, "warmup_runs": 2}}
    victim = stack.submit(_slow_model(), slow)
    running = _wait_until(lambda: (j := stack.job(victim))["state"] == "running" and j, HANG_S, "the slow job to run")
    record = json.loads((stack.data / "jobs" / victim / "job.json").read_text())
    host, _, pid = record["worker"].rpartition(":")
    assert running["state"] == "running" and host == socket.gethostname()
    stack.kill_worker(int(pid))  # the whole worker process, not just the job's child
    others = [stack.submit(models.mlp().SerializeToString(), FAST) for _ in range(3)]

    job = stack.finished(victim)
    assert job["state"] == "failed" and job["error"]["code"] == "interrupted", job
    assert [stack.finished(i)["state"] for i in others] == ["succeeded"] * 3
    # The killed worker's job process, and the warm one it kept for its next job, died with it.
    assert wait_until(lambda: job_processes(stack.data / "jobs" / victim) == [], HANG_S, "the job process to die")
    leftovers = subprocess.run(["pgrep", "-f", f"service.job_process .*--parent-pid {pid} "], capture_output=True)
    assert leftovers.stdout.strip() == b""
