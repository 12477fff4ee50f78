"""One running service for the whole hostile corpus, sentinel files around it, and the checks run after each case.

Not a conftest.py: a second conftest module collected in the same run would shadow another folder's. The
test modules import the fixture from here; the service helpers come from tests/service_harness.py.

The service's data directory is ROOT/data; ROOT/sentinel.txt sits beside it and the process's working
directory is ROOT/cwd (with its own sentinel.txt). Cases that must run into the job deadline go to a twin whose
jobs get a few seconds (ROOT/data-deadline); every other job gets a deadline that only bounds a hang, so a valid
job on a loaded host is never cut off. After each case nothing outside ROOT/data/jobs/<id>/ and
the queue database may have appeared or changed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from corpus import TOKEN
from service_harness import make_settings, running_service

TESTS_DIR = Path(__file__).resolve().parent.parent
JOB_DIR = re.compile(r"data(-protected|-deadline)?/jobs/[0-9a-f]{32}(/.*)?")
QUEUE_DB = re.compile(r"data(-protected|-deadline)?/queue\.db(-wal|-shm|-journal)?")
JOB_TIMEOUT_S = 600  # bounds a hang of the main app's jobs
DEADLINE_S = 3  # the deadline twin's jobs: what a case that runs forever is stopped by
# A path of the server's file system in a message: "/tmp/...", "/home/...", ... (not "../../etc/passwd" quoted).
SERVER_PATH = re.compile(r"(?<![.\w])/(?:tmp|home|root|usr|var|opt|work|proc|srv|mnt|data)/")


@dataclasses.dataclass
class Service:
    """The running app, its token-protected twin, its short-deadline twin and the sentinel files around them."""

    root: Path
    client: Any
    protected: Any
    deadline: Any
    baseline: dict[str, tuple[int, int, bytes]]
    cases_since_valid_job: int = 0


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file and folder under root outside job folders and the queue db: (mtime_ns, size, head of content)."""
    found: dict[str, tuple[int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if JOB_DIR.fullmatch(rel) or QUEUE_DB.fullmatch(rel):
                continue
            stat = path.lstat()
            content = path.read_bytes()[:4096] if path.is_file() and not path.is_symlink() else b""
            found[rel] = (0 if path.is_dir() else stat.st_mtime_ns, stat.st_size if path.is_file() else 0, content)
        dirnames[:] = [d for d in dirnames if not JOB_DIR.fullmatch((Path(dirpath) / d).relative_to(root).as_posix())]
    return found


def check_nothing_outside_job_folders(service: Service) -> None:
    """No file beside the data dir, in the cwd or in data/ (but job folders and the queue) appeared or changed."""
    now = snapshot(service.root)
    changed = {k for k in set(now) | set(service.baseline) if now.get(k) != service.baseline.get(k)}
    assert not changed, f"files outside job folders appeared or changed: {sorted(changed)}"
    assert Path.cwd() == service.root / "cwd", "the process's working directory changed"


def check_no_server_path(service: Service, text: str) -> None:
    """No absolute path of this machine in a response or a job's message."""
    for path in {str(service.root), str(service.root.resolve()), str(TESTS_DIR.parent)}:
        assert path not in text, f"a server path leaks: {text[:300]}"
    assert not SERVER_PATH.search(text), f"a server path leaks: {text[:300]}"


@pytest.fixture(scope="module", name="hostile_service")
def hostile_service_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The app (2 workers, 2 MB model cap, 1 MB data cap, 1500 MB per job), a token-protected twin and a twin
    whose jobs have DEADLINE_S."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "cwd").mkdir()
    (root / "sentinel.txt").write_text("beside the data directory\n")
    (root / "cwd" / "sentinel.txt").write_text("in the working directory\n")
    limits = {"workers": 2, "max_model_mb": 2, "max_data_mb": 1, "job_memory_mb": 1500}
    settings = make_settings(root / "data", **limits, job_timeout_s=JOB_TIMEOUT_S)
    protected_settings = make_settings(root / "data-protected", **limits, token=SecretStr(TOKEN))
    deadline_settings = make_settings(root / "data-deadline", **limits | {"workers": 1}, job_timeout_s=DEADLINE_S)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root / "cwd")
        with (
            running_service(settings) as client,
            running_service(protected_settings, embedded_worker=False) as protected,
            running_service(deadline_settings) as deadline,
        ):
            # The protected twin has no worker: a job it accepts stays queued (its folder is its own tree).
            service = Service(root, client, protected, deadline, {})
            service.baseline = snapshot(root)
            yield service
    assert Path.cwd() != root / "cwd"
