"""Helpers for the service, fault and hostile-input tests: a real app, its embedded Huey consumer and job processes.

A plain module (importable because pytest puts tests/ on the path), not a conftest: `conftest` names a
different module depending on which test folders pytest collects.

Every test app lives in its own data directory (SQLite queue included). `ServiceClient` checks each response
for the data directory's path: no answer may show a server path.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings

# latency_seconds 0: just latency_runs timed pairs (by default timing goes on for up to 10 s until its interval
# narrows, which on a loaded host it rarely does). Latency itself is tested in tests/test_timing.py.
FAST = {"latency_runs": 3, "warmup_runs": 1, "latency_seconds": 0.0}
HEARTBEAT_S = 30.0  # a job is reaped as interrupted after 4 of them without a beat: only a hang gets that far
# Every wait below bounds a hang, never a duration: on a host at load 20 a job or a folder's removal that takes a
# second when idle may take a minute. A wait fails only after this long, whatever its own timeout says.
HANG_S = 300.0
TERMINAL = frozenset({"succeeded", "failed"})


class ServiceClient(TestClient):
    """A TestClient that fails the test when a response carries the server's data directory path."""

    def __init__(self, app: Any, data_dir: Path, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.data_dir = data_dir

    def request(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        response = super().request(*args, **kwargs)
        for path in {str(self.data_dir), str(self.data_dir.resolve())}:
            assert path.encode() not in response.content, f"response leaks a server path: {response.text[:300]}"
        return response


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test app: loopback, TestClient's Host allowed, no disk guard, the default heartbeat.

    A running job is declared interrupted when its heartbeat is 4 heartbeats old. With 0.5 s heartbeats a
    supervising thread that a loaded host did not schedule for 2 s lost its own live job; no test relies on the
    reaper's timing (stale jobs are made stale by their recorded heartbeat).
    """
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "allowed_hosts": ["testserver", "127.0.0.1"],
        "min_free_disk_mb": 0,
        "heartbeat_s": HEARTBEAT_S,
        "workers": 1,
    }
    return Settings(**(values | overrides))


@contextlib.contextmanager
def running_service(settings: Settings, *, embedded_worker: bool = True, **kwargs: Any) -> Iterator[ServiceClient]:
    """The app with its lifespan started (queue recovery and, by default, the embedded consumer)."""
    app = create_app(settings, embedded_worker=embedded_worker)
    with ServiceClient(app, settings.data_dir, **kwargs) as client:
        yield client


def plan_json(*steps: dict[str, Any], **extra: Any) -> str:
    """A plan with quick evaluation settings, as the form field's JSON text."""
    return json.dumps({"steps": list(steps), "evaluation": FAST} | extra)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An .npz file's bytes."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def calibration_for_mlp(samples: int = 16) -> bytes:
    """Calibration data for models.mlp(): input "x" of 64 features."""
    return npz_bytes(x=np.random.default_rng(1).standard_normal((samples, 64)).astype(np.float32))


def mlp_bytes() -> bytes:
    """A small MatMul/Add/Relu classifier (about 100 KB)."""
    import models

    return models.mlp().SerializeToString()


def slow_model_bytes() -> bytes:
    """A model big enough that 10,000 latency runs take many seconds (about 6 MB)."""
    import models

    return models.mlp((512, 1024, 1024, 10)).SerializeToString()


# 10,000 timed runs of each model on a batch of 256: a minute or more even on a fast idle machine (at batch 1 a
# fast machine finished within a 5 s deadline). Every test that uses it kills the job or lets its deadline do it.
SLOW_PLAN = json.dumps(
    {
        "steps": [{"kind": "prune", "method": "unstructured", "sparsity": 0.5}],
        "input_shapes": {"x": [256, 512]},
        "evaluation": {"latency_runs": 10_000, "warmup_runs": 1},
    }
)


BOUNDARY = "test-boundary-7d1f0c"


def multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    """A multipart/form-data body (with BOUNDARY) of (field name, file name or None, content) parts."""
    out = bytearray()
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += content + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def job_body(model: bytes, plan: str) -> bytes:
    """The multipart/form-data body (with BOUNDARY) of a job upload: the plan field and the model file."""
    return multipart([("plan", None, plan.encode()), ("model", "net.onnx", model)])


def submit(
    client: TestClient,
    model: bytes | None,
    plan: str | None,
    *,
    model_name: str = "net.onnx",
    calibration: bytes | None = None,
    evaluation: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    """POST /api/jobs as multipart/form-data, leaving out the parts that are None."""
    parts: list[tuple[str, str | None, bytes]] = []
    if plan is not None:
        parts.append(("plan", None, plan.encode()))
    if model is not None:
        parts.append(("model", model_name, model))
    if calibration is not None:
        parts.append(("calibration", "calib.npz", calibration))
    if evaluation is not None:
        parts.append(("evaluation", "eval.npz", evaluation))
    return client.post("/api/jobs", content=multipart(parts), headers=MULTIPART | (headers or {}))


def submit_ok(client: TestClient, model: bytes, plan: str, **kwargs: Any) -> str:
    """Submit a job that must be accepted; its id."""
    response = submit(client, model, plan, **kwargs)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy and return it; fail the test with `what` at the deadline.

    The deadline is `timeout` or HANG_S, whichever is longer: it only bounds a hang.
    """
    timeout = max(timeout, HANG_S)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def wait_for_job(
    client: TestClient, job_id: str, states: frozenset[str] = TERMINAL, timeout: float = 60.0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll GET /api/jobs/{id} until its state is in `states`; the last answer and every answer seen."""
    seen: list[dict[str, Any]] = []

    def done() -> bool:
        response = client.get(f"/api/jobs/{job_id}")
        assert response.status_code == 200, response.text
        seen.append(response.json())
        return seen[-1]["state"] in states

    wait_until(done, timeout, f"job {job_id} to reach {sorted(states)}")
    return seen[-1], seen


def job_processes(folder: Path) -> list[int]:
    """Pids of live job processes working on this job folder.

    A job process started for the job names the folder on its command line; a warm one that was handed the
    job (``--standby``) works inside it (its current directory).
    """
    pids = []
    folder = folder.resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = Path(os.readlink(entry / "cwd")) if b"service.job_process" in args else None
        except OSError:
            continue
        if cwd is not None and state != "Z" and (str(folder).encode() in args or cwd == folder):
            pids.append(int(entry.name))
    return pids


def group_alive(pgid: int) -> bool:
    """True while any process is left in this process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def error_of(response: Any) -> dict[str, str]:
    """The {"code", "message"} of an error response, checking its shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"], body
    assert isinstance(error["message"], str) and error["message"], body
    return dict(error)
