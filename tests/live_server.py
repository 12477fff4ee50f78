"""The app served by a real uvicorn (with the service's own server options) in a thread, and raw socket clients.

A plain module (pytest puts tests/ on the path). Clients can connect from any loopback address (127.0.0.2,
127.0.0.3, ...: Linux routes all of 127.0.0.0/8 to the loopback interface), so that tests can play several
client machines against the per-client upload limit.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import uvicorn

from service.http_server import server_options
from service.main import create_app

from service_harness import BOUNDARY, MULTIPART, job_body, make_settings, plan_json, wait_until

__all__ = ["PLAN", "LiveServer", "read_answer", "upload_head"]

PLAN = plan_json({"kind": "prune", "sparsity": 0.5})


class LiveServer:
    """The app (embedded worker by default) served by uvicorn on a free loopback port, as `serve` runs it."""

    def __init__(self, data_dir: Path, *, embedded_worker: bool = True, **overrides: Any) -> None:
        settings = make_settings(data_dir, **({"threads_per_job": 1} | overrides))
        self.jobs_dir = settings.jobs_dir
        options = server_options(settings) | {"port": 0, "log_level": "error"}
        config = uvicorn.Config(create_app(settings, embedded_worker=embedded_worker), **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-live", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn to start")
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def folders(self) -> list[str]:
        """Names of the job folders (uploads in progress included)."""
        return sorted(p.name for p in self.jobs_dir.iterdir()) if self.jobs_dir.exists() else []

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        """A connection from the loopback address `source`."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=30, source_address=(source, 0))

    def stall(self, body_bytes: int = 1000, source: str = "127.0.0.1") -> socket.socket:
        """A client that sends the headers and the first bytes of a large upload, then nothing."""
        head, _, _ = job_body(b"@@", PLAN).partition(b"@@")
        sock = self.connect(source)
        sock.sendall(upload_head(len(head) + 1_000_000) + head + b"\0" * body_bytes)
        return sock

    def post(self, body: bytes, source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
        """A complete upload, sent at once: (status, headers, body) of the answer."""
        with self.connect(source) as sock:
            sock.sendall(upload_head(len(body)) + body)
            return read_answer(sock)

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """GET path on a fresh connection."""
        with self.connect() as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return read_answer(sock)


def upload_head(length: int, extra: str = "") -> bytes:
    """The request head of a POST /api/jobs with a multipart body of `length` bytes (BOUNDARY)."""
    assert MULTIPART["Content-Type"].endswith(BOUNDARY)
    return (
        "POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: {MULTIPART['Content-Type']}\r\nContent-Length: {length}\r\n{extra}\r\n"
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
