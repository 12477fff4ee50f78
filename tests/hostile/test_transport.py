"""The transport as an attacker meets it: the image's defaults, request heads and bodies, what a job process inherits.

- The Docker image's settings, read from the Dockerfile itself, refuse a rebinding Host name without a token.
- A request head that never ends is answered 408 and closed (uvicorn alone would hold it for ever).
- The whole multipart body is capped: its declared length, and what lies before the first part and after
  the closing boundary; an overlong boundary is a 400, not a 500.
- A job's process sees none of the server's secrets, and never runs more threads than the server gives a job.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import worker
from service.settings import Settings

import models
from live_server import PLAN, LiveServer, read_answer, upload_head
from service_harness import (
    BOUNDARY,
    FAST,
    MULTIPART,
    ServiceClient,
    error_of,
    job_body,
    make_settings,
    plan_json,
    running_service,
    submit_ok,
    wait_for_job,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]


def dockerfile_env() -> dict[str, str]:
    """The COMPRESS_* variables the Dockerfile's ENV instructions set (what `docker run` starts with)."""
    lines = (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    env: dict[str, str] = {}
    for line in lines:
        if line.startswith("ENV "):
            env |= dict(word.split("=", 1) for word in shlex.split(line[4:]))
    return {k: v for k, v in env.items() if k.startswith("COMPRESS_")}


@pytest.fixture
def image_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings read from the environment exactly as the image sets it (with no token), data in tmp_path."""
    for name in [n for n in os.environ if n.startswith("COMPRESS_")]:
        monkeypatch.delenv(name)
    for name, value in dockerfile_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path / "data"))
    return Settings()


# --- class 3: the image keeps the DNS-rebinding defence ----------------------------------------------------


def test_the_image_answers_loopback_host_names_and_refuses_a_rebinding_one(image_settings: Settings) -> None:
    assert image_settings.token is None and image_settings.host == "0.0.0.0"
    image_settings.check_bind()  # starts as `docker run -p 127.0.0.1:8000:8000 ...` starts it
    with running_service(image_settings, embedded_worker=False) as client:
        for host in ("127.0.0.1:8000", "localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example:8000", "evil.example", "127.0.0.1.evil.example:8000"):
            for path in ("/api/jobs", "/healthz", "/"):
                response = client.get(path, headers={"Host": host})
                assert response.status_code == 400, (host, path, response.text)
                assert error_of(response)["code"] == "bad_host"
        refused = client.post("/api/jobs", headers={"Host": "evil.example:8000"} | MULTIPART, content=b"x")
        assert refused.status_code == 400 and error_of(refused)["code"] == "bad_host"


@pytest.mark.parametrize("hosts", ['["compress.example"]', '["*"]', '["127.0.0.1", "192.168.1.20"]'])
def test_the_image_without_a_token_refuses_to_start_for_other_host_names(
    image_settings: Settings, monkeypatch: pytest.MonkeyPatch, hosts: str
) -> None:
    monkeypatch.setenv("COMPRESS_ALLOWED_HOSTS", hosts)
    with pytest.raises(SystemExit, match="without a token"):
        Settings().check_bind()
    monkeypatch.setenv("COMPRESS_TOKEN", "a-token-that-is-long-enough-0123456789")
    Settings().check_bind()  # with a token any name may be served


# --- class 6: request heads that never end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real uvicorn with a 1 s head deadline and 1 MB caps (no worker), as `serve` runs it."""
    data = tmp_path_factory.mktemp("transport") / "data"
    with LiveServer(data, embedded_worker=False, header_timeout_s=1.0, max_model_mb=1, max_data_mb=1) as server:
        yield server


def _closed_after(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's own timeout bounds the wait)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_request_head_that_never_ends_is_answered_408_and_closed(live: LiveServer) -> None:
    with live.connect() as sock:
        sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        answer = _closed_after(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "header_timeout"


def test_a_connection_that_sends_nothing_is_closed(live: LiveServer) -> None:
    with live.connect() as sock:
        assert _closed_after(sock) == b""


def test_a_kept_alive_connection_whose_next_head_never_ends_is_closed(live: LiveServer) -> None:
    with live.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_answer(sock)[0] == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # and one header byte at a time would be no better
        answer = _closed_after(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert live.get("/healthz")[0] == 200  # the server itself goes on


# --- class 2 (part): the whole multipart body is capped ----------------------------------------------------


def test_a_declared_length_over_the_whole_body_cap_is_refused_before_reading(live: LiveServer) -> None:
    with live.connect() as sock:
        sock.sendall(upload_head(1 << 40))  # a terabyte, and no body at all: the length alone is refused
        status, _, body = read_answer(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "upload_too_large", body
    assert live.folders() == []


@pytest.fixture
def client(tmp_path: Path) -> Iterator[ServiceClient]:
    with running_service(make_settings(tmp_path / "data", max_model_mb=1, max_data_mb=1), embedded_worker=False) as c:
        yield c


@pytest.mark.parametrize(
    ("before", "after"),
    [(b"", b"x" * (200 << 10)), (b"", b"\r\n" * (100 << 10)), (b"\r\n" * (100 << 10), b"")],
    ids=["epilogue", "epilogue-of-newlines", "preamble-of-newlines"],
)
def test_bytes_outside_the_form_parts_are_capped(client: ServiceClient, before: bytes, after: bytes) -> None:
    body = before + job_body(models.mlp().SerializeToString(), PLAN) + after
    response = client.post("/api/jobs", content=body, headers=MULTIPART)
    assert response.status_code == 413, response.text
    assert error_of(response)["code"] == "upload_too_large"
    assert not any((client.data_dir / "jobs").iterdir())


def test_a_small_epilogue_is_still_accepted(client: ServiceClient) -> None:
    body = job_body(models.mlp().SerializeToString(), PLAN) + b"\r\nthe end\r\n"
    response = client.post("/api/jobs", content=body, headers=MULTIPART)
    assert response.status_code == 202, response.text


# --- class 9 (parts) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [257, 300, 5000])
def test_an_overlong_multipart_boundary_is_a_400(client: ServiceClient, length: int) -> None:
    boundary = "b" * length
    body = job_body(b"model", PLAN).replace(BOUNDARY.encode(), boundary.encode())
    response = client.post(
        "/api/jobs", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "malformed_upload"
    assert not any((client.data_dir / "jobs").iterdir())


SECRETS = {
    "COMPRESS_TOKEN": "server-secret-token-0123456789abcdef",
    "COMPRESS_REDIS_URL": "redis://:password@redis.internal:6379/0",
    "AWS_SECRET_ACCESS_KEY": "not-for-models",
}


def test_a_job_process_inherits_none_of_the_servers_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text(SECRETS["COMPRESS_TOKEN"])
    for name, value in (SECRETS | {"COMPRESS_TOKEN_FILE": str(secret_file)}).items():
        monkeypatch.setenv(name, value)
    settings = make_settings(tmp_path / "data", redis_url=None)
    with running_service(settings):
        # The warm job process the embedded worker starts is the one that will parse the next upload.
        children = wait_until(lambda: list(worker._standby), 60, "a warm job process to start")
        environ = Path(f"/proc/{children[0][1].pid}/environ").read_bytes().split(b"\0")
    names = {entry.partition(b"=")[0].decode() for entry in environ if entry}
    assert names & {*SECRETS, "COMPRESS_TOKEN_FILE"} == set(), sorted(names)
    assert not any(value.encode() in b"\0".join(environ) for value in SECRETS.values())
    assert "PYTHONPATH" in names and names <= {*worker.CHILD_ENV, "PYTHONPATH"}, sorted(names)


def test_a_plan_cannot_run_more_threads_than_the_server_gives_a_job(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", threads_per_job=1)
    plan = plan_json({"kind": "prune", "sparsity": 0.5}, evaluation=FAST | {"threads": 256})
    with running_service(settings) as client:
        job_id = submit_ok(client, models.mlp().SerializeToString(), plan)
        job, _ = wait_for_job(client, job_id, timeout=120)
        assert job["state"] == "succeeded", job
        report = client.get(f"/api/jobs/{job_id}/report").json()
    assert report["host"]["threads"] == 1, report["host"]
    assert report["plan"]["evaluation"]["threads"] == 1
    assert any("asked for 256 threads" in warning for warning in report["warnings"]), report["warnings"]
    assert b"asked for 256 threads" in (settings.jobs_dir / job_id / "job.log").read_bytes()
