"""Browser tests: the real app under uvicorn (embedded Huey worker, real job processes) and Debian's Chromium.

Playwright cannot download its own browsers here, so it drives the system Chromium (`apt-get install chromium`).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import uvicorn

from service.main import create_app
from service.settings import Settings

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage, Dialog, Page, Request

# Every wait of these tests bounds a hang, not a duration: on a loaded host (CI shares 2 cores) a page's next poll
# or a job's start can take far longer than Playwright's defaults (5 s per assertion, 30 s per action).
HANG_MS = 120_000

# tests/ holds the shared model builders (tests/models.py); pytest only puts this folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHROMIUM = "/usr/bin/chromium"  # Debian's package
REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark everything here `e2e`, and skip it with a clear reason when the browser is missing."""
    here = Path(__file__).parent
    missing = not Path(CHROMIUM).exists()
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            if missing:
                item.add_marker(pytest.mark.skip(reason=f"{CHROMIUM} not found: apt-get install -y chromium"))


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """Launch Debian's Chromium quietly: no sandbox (containers), no GPU, no background traffic."""
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
        ],
    }


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    """A 1000 px wide window (the width the pages are designed for) that accepts downloads."""
    return {**browser_context_args, "viewport": {"width": 1000, "height": 900}, "accept_downloads": True}


@pytest.fixture(scope="session", autouse=True)
def _patient_assertions() -> None:
    """Give every `expect(...)` HANG_MS unless it names its own timeout."""
    from playwright.sync_api import expect

    expect.set_options(timeout=HANG_MS)


@pytest.fixture
def page(page: Page) -> Page:
    """pytest-playwright's page, with HANG_MS for every action and wait that names no timeout."""
    page.set_default_timeout(HANG_MS)
    return page


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go (kept by CI): $E2E_ARTIFACTS, default artifacts/ in the repository."""
    path = Path(os.environ.get("E2E_ARTIFACTS") or REPO / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Watch:
    """What a page did that a user would call broken: dialogs (an escaping bug running a name's script), console
    errors (CSP refusals, script errors) and requests to any other origin (the pages must work offline)."""

    def __init__(self, page: Page) -> None:
        self.problems: list[str] = []
        page.on("dialog", self._dialog)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"script error: {error}"))
        page.on("request", self._request)
        self.origin: str | None = None

    def _dialog(self, dialog: Dialog) -> None:
        self.problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.problems.append(f"console: {msg.text}")

    def _request(self, request: Request) -> None:
        url = request.url
        if self.origin and not url.startswith((self.origin, "data:", "blob:", "about:")):
            self.problems.append(f"request to another origin: {url}")


@pytest.fixture
def watch(page: Page) -> Watch:
    """Record the page's dialogs, console errors and requests leaving the server (see Watch)."""
    return Watch(page)


class LiveServer:
    """The app served by uvicorn in a thread, on a port the OS picked."""

    def __init__(self, settings: Settings, embedded_worker: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))  # handing uvicorn the bound socket avoids a free-port race
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(settings, embedded_worker=embedded_worker)
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> None:
        """Start serving and wait until the app has run its startup."""
        self.thread.start()
        deadline = time.monotonic() + HANG_MS / 1000
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop serving (the app's shutdown stops the worker and its job processes)."""
        self.server.should_exit = True
        self.thread.join(timeout=40)
        self.sock.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start the app with Settings(**overrides) on a fresh data directory; returns its base URL.

    `embedded_worker=False` starts no worker: jobs stay queued until a test moves them on.
    """
    servers: list[LiveServer] = []

    def start(embedded_worker: bool = True, **overrides: Any) -> str:
        defaults: dict[str, Any] = {
            "data_dir": tmp_path / f"data{len(servers)}",
            "min_free_disk_mb": 0,  # CI disks can be small; the disk guard has its own tests
            "allowed_hosts": ["127.0.0.1"],
            "workers": 1,
        }
        server = LiveServer(Settings(**(defaults | overrides)), embedded_worker)
        server.start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()
