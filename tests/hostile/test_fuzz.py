"""API fuzzing: schemathesis generates requests from the service's own OpenAPI schema; none may get a 5xx.

The app runs in a live uvicorn on loopback (its lifespan started, queue opened) without a worker, so the
uploads it accepts stay queued; the queue cap is raised so "busy" (503 by design) never answers instead.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
uvicorn = pytest.importorskip("uvicorn")

from hypothesis import HealthCheck, settings  # noqa: E402

from service.main import create_app  # noqa: E402

from hostile_harness import SERVER_PATH  # noqa: E402 - after the importorskips
from service_harness import make_settings  # noqa: E402

MAX_EXAMPLES = 60  # per operation; the whole module stays well under a minute


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Live:
    def __init__(self, app: Any, data_dir: Path) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Live:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Live]:
    """The service on a loopback port, no worker, a 1 MB model cap."""
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    config = make_settings(
        data_dir, allowed_hosts=["127.0.0.1"], max_model_mb=1, max_data_mb=1, max_queued_jobs=100_000
    )
    with _Live(create_app(config, embedded_worker=False), data_dir) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(live: _Live) -> Any:
    """The service's own OpenAPI document, fetched from it."""
    import requests

    document = requests.get(f"{live.base_url}/openapi.json", timeout=10).json()
    return schemathesis.openapi.from_dict(document)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_error(case: Any, live: _Live) -> None:
    response = case.call(base_url=live.base_url, timeout=30)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
    )
    assert str(live.data_dir) not in response.text and str(live.data_dir.parent) not in response.text
    assert not SERVER_PATH.search(response.text), response.text[:300]
