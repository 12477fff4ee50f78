"""Slow and vanishing clients against a real uvicorn: they may hold an upload slot only until the upload timeout.

Two clients that start an upload and then stall take both slots (max_uploads_in_flight=2): everyone else is
refused with 503 + Retry-After, but only until the stalled uploads are cut off with 408; then uploads are
accepted again, and the stalled ones left nothing on disk. A client that disconnects frees its slot at once.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from service.main import create_app

import models
from service_harness import BOUNDARY, MULTIPART, TERMINAL, job_body, make_settings, plan_json, wait_until

pytestmark = pytest.mark.slow

UPLOAD_TIMEOUT_S = 3.0
PLAN = plan_json({"kind": "prune", "sparsity": 0.5})


class Server:
    """The app with its embedded worker, served by uvicorn in a thread on a free loopback port."""

    def __init__(self, data_dir: Path, upload_timeout_s: float) -> None:
        settings = make_settings(
            data_dir, max_uploads_in_flight=2, upload_timeout_s=upload_timeout_s, threads_per_job=1
        )
        self.jobs_dir = settings.jobs_dir
        config = uvicorn.Config(create_app(settings, embedded_worker=True), host="127.0.0.1", port=0, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-faults", daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn to start")
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def folders(self) -> list[str]:
        """Names of the job folders (uploads in progress included)."""
        return sorted(p.name for p in self.jobs_dir.iterdir())

    def stall(self, body_bytes: int = 1000) -> socket.socket:
        """A client that sends the headers and the first bytes of a large upload, then nothing."""
        head, _, _ = job_body(b"@@", PLAN).partition(b"@@")
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.sendall(self._request_head(len(head) + 1_000_000) + head + b"\0" * body_bytes)
        return sock

    def post(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """A complete upload, sent at once: (status, headers, body) of the answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(self._request_head(len(body)) + body)
            return read_answer(sock)

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """GET path on a fresh connection."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return read_answer(sock)

    @staticmethod
    def _request_head(length: int) -> bytes:
        assert MULTIPART["Content-Type"].endswith(BOUNDARY)
        return (
            "POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: {MULTIPART['Content-Type']}\r\nContent-Length: {length}\r\n\r\n"
        ).encode()


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the server's answer (read up to Content-Length or the close)."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if len(body) >= int(headers.get("content-length", "0")):
                return int(lines[0].split()[1]), headers, body
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the server closed the connection; it had sent {data[:200]!r}")
        data += chunk


def _job_state(server: Server, job_id: str) -> str | None:
    status, _, body = server.get(f"/api/jobs/{job_id}")
    assert status == 200, body
    state: str = json.loads(body)["state"]
    return state if state in TERMINAL else None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with Server(tmp_path / "data", UPLOAD_TIMEOUT_S) as server:
        yield server


@pytest.fixture(scope="module")
def model() -> bytes:
    return models.mlp().SerializeToString()


def test_stalled_uploads_hold_their_slots_only_until_the_upload_timeout(server: Server, model: bytes) -> None:
    stalled = [server.stall(), server.stall()]
    try:
        wait_until(lambda: len(server.folders()) == 2, 10, "both stalled uploads to take a slot")
        started = time.monotonic()

        # Both slots taken: a third client is refused at once, with a hint when to come back.
        status, headers, body = server.post(job_body(model, PLAN))
        assert status == 503, body
        assert b'"busy"' in body
        assert headers.get("retry-after", "").isdigit(), headers
        # Status requests do not need a slot.
        assert server.get("/healthz")[0] == 200

        # The stalled uploads are cut off with 408 around the timeout, and their folders are removed.
        answers = [read_answer(sock) for sock in stalled]
        assert [a[0] for a in answers] == [408, 408], answers
        assert all(b'"upload_timeout"' in a[2] for a in answers)
        assert time.monotonic() - started < UPLOAD_TIMEOUT_S + 5
    finally:
        for sock in stalled:
            sock.close()
    wait_until(lambda: server.folders() == [], 10, "the stalled uploads' folders to be removed")

    # The slots are free again: a normal upload is accepted and its job runs to the end.
    status, _, body = server.post(job_body(model, PLAN))
    assert status == 202, body
    job_id = json.loads(body)["id"]
    assert wait_until(lambda: _job_state(server, job_id), 60, "the job to finish", poll=0.1) == "succeeded"
    assert server.folders() == [job_id]


def test_client_that_disconnects_mid_upload_frees_its_slot_at_once(tmp_path: Path, model: bytes) -> None:
    # A long upload timeout: only the disconnect can give the slot back within this test.
    with Server(tmp_path / "data", upload_timeout_s=120) as server:
        holder, leaver = server.stall(), server.stall(body_bytes=200_000)
        try:
            wait_until(lambda: len(server.folders()) == 2, 10, "both uploads to take a slot")
            assert server.post(job_body(model, PLAN))[0] == 503
            leaver.close()
            wait_until(lambda: len(server.folders()) == 1, 10, "the abandoned upload's folder to be removed")

            status, _, body = server.post(job_body(model, PLAN))
            assert status == 202, body
        finally:
            holder.close()
            leaver.close()
        wait_until(lambda: len(server.folders()) == 1, 10, "the other abandoned upload's folder to be removed")


def test_clients_stuck_in_their_request_headers_take_no_upload_slot(server: Server, model: bytes) -> None:
    stuck: list[socket.socket] = []
    try:
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
            stuck.append(sock)
        status, _, body = server.post(job_body(model, PLAN))
        assert status == 202, body
    finally:
        for sock in stuck:
            sock.close()


def test_a_refused_client_still_sending_a_large_body_reads_the_503_not_a_reset(server: Server) -> None:
    """Without `Expect: 100-continue` a client sends its whole body before it reads; the 503 must reach it."""
    big = job_body(b"\0" * (24 << 20), PLAN)  # far more than the socket buffers hold
    stalled = [server.stall(), server.stall()]
    try:
        wait_until(lambda: len(server.folders()) == 2, 10, "both stalled uploads to take a slot")
        for _ in range(3):
            status, headers, body = server.post(big)
            assert status == 503, body
            assert json.loads(body)["error"]["code"] == "busy"
            assert headers.get("retry-after", "").isdigit(), headers
        assert len(server.folders()) == 2  # the refused bodies were thrown away, not stored
    finally:
        for sock in stalled:
            sock.close()


def test_a_refused_client_that_asked_100_continue_is_answered_without_sending_its_body(server: Server) -> None:
    stalled = [server.stall(), server.stall()]
    try:
        wait_until(lambda: len(server.folders()) == 2, 10, "both stalled uploads to take a slot")
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            head = server._request_head(64 << 20).replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
            sock.sendall(head)  # and no body: the server must answer without asking for it
            status, _, body = read_answer(sock)
        assert status == 503, body
    finally:
        for sock in stalled:
            sock.close()
