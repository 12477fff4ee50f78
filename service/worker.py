"""Runs one job: claims it, starts its own child process with limits, supervises it to its deadline."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from service.job_files import open_job_file, private_opener, read_capped
from service.job_upload import drop_upload
from service.jobs import INPUT_FILES, JobError, JobState, JobStore
from service.settings import Settings

__all__ = ["accept_jobs", "kill_all_children", "run_job", "worker_name"]

logger = logging.getLogger(__name__)

_children: set[subprocess.Popen[bytes]] = set()
_children_lock = threading.Lock()
# Warm job processes (``job_process --standby``) waiting for a job, by their command line (= the settings).
_standby: list[tuple[tuple[str, ...], subprocess.Popen[bytes]]] = []
JOB_TEMP = "tmp"  # the job process's temp folder in its job folder (its TMPDIR, see service.job_process)
_stopping = threading.Event()  # set on shutdown: claim no new job, and a killed child means "interrupted"


def accept_jobs(settings: Settings | None = None) -> None:
    """Let this process run jobs (again): called when a consumer starts; warms up a job process for `settings`."""
    _stopping.clear()
    if settings is not None:
        _start_standby(settings)


def kill_all_children() -> None:
    """On shutdown: take no new job and kill every job process this worker started (none may outlive it).

    The jobs end as failed with code "interrupted" (recorded by their worker threads).
    """
    with _children_lock:
        _stopping.set()
        children = list(_children)
        _standby.clear()
    for child in children:
        _kill(child)


def worker_name() -> str:
    """host:pid of this worker, recorded on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_is_dead(name: str) -> bool:
    """True when `name` (host:pid) is a worker process of this host that no longer runs.

    Workers of other hosts are never declared dead here; their heartbeats going stale says it instead.
    """
    host, _, pid = name.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def run_job(settings: Settings, store: JobStore, job_id: str) -> JobState | None:
    """Run a queued job to its end; None when the job was not ours to run (gone, claimed elsewhere, shutting down)."""
    if _stopping.is_set():
        return None  # the job stays queued; JobQueue.recover enqueues it again after the restart
    job = store.claim(job_id, worker_name())
    if job is None:
        return None
    folder = store.path(job_id)
    for name in ("output.onnx", "output.zip", "report.json", "report.html", "error.json", "progress.json"):
        (folder / name).unlink(missing_ok=True)  # leftovers of an interrupted earlier attempt
    error = _supervise(settings, store, job_id, folder)
    if error is not None:
        _drop_upload(job_id, folder)
    store.finish(job_id, error)
    logger.info("job %s %s", job_id, "failed: " + error.code if error else "succeeded")
    return JobState.failed if error else JobState.succeeded


def _drop_upload(job_id: str, folder: Path) -> None:
    """Delete the upload and temp files of a job whose process ended without success (reaped: nothing reads them).

    The job's process deletes its upload itself once it has its own copy of the model, and when it ends or fails,
    and its temp files (the job's copy of the model, or a bundle's data files moved there) as it ends; a process
    killed (time limit, memory limit, a crash, shutdown) does none of that, and they (maybe GBs) would stay until
    the job is purged. Nothing runs the job again: it ends as failed here (a job is run again only when its warm
    process died before taking it, which `_supervise` does before it returns). Results and reports are not touched.
    """
    try:
        drop_upload(folder)
        temp = folder / JOB_TEMP
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)  # follows no link inside it
    except OSError:
        logger.warning("job %s: its upload or temp files could not be deleted; they go when it is purged", job_id)


def _job_limits(settings: Settings, folder: Path | None) -> tuple[int, int]:
    """(memory MB, file MB) for the job in `folder` (by its upload's size), or for a warm process (no job yet).

    A bundle's archive is deleted once unpacked: a job run again after that is sized by the unpacked files.
    """
    if folder is None:
        return settings.job_limits(0)
    try:
        upload = folder / INPUT_FILES["model"]
        if upload.exists():
            return settings.job_limits(upload.stat().st_size)
        walk = os.walk(folder / "model")
        return settings.job_limits(sum(os.lstat(Path(root, name)).st_size for root, _, names in walk for name in names))
    except OSError:
        return settings.job_limits(0)


def _command(settings: Settings, folder: Path | None, limits: tuple[int, int] | None = None) -> list[str]:
    memory_mb, file_mb = limits or _job_limits(settings, None)
    return [
        sys.executable,
        "-P",
        "-m",
        "service.job_process",
        str(folder) if folder is not None else "--standby",
        "--parent-pid",
        str(os.getpid()),
        "--threads",
        str(settings.job_threads),
        "--memory-mb",
        str(memory_mb),
        "--file-mb",
        str(file_mb),
        "--cpu-s",
        str(settings.job_timeout_s * max(1, settings.job_threads) + 60),
        "--max-model-mb",
        str(settings.max_model_mb),
        "--max-data-mb",
        str(settings.max_data_mb),
        "--external-data-mb",
        str(settings.result_external_data_mb),
    ]


def _supervise(settings: Settings, store: JobStore, job_id: str, folder: Path) -> JobError | None:
    limits = _job_limits(settings, folder)  # a warm process serves only a job whose limits are its own
    standby = _hand_to_standby(settings, folder, limits)
    if standby is not None:
        code = _watch(settings, store, job_id, standby)
        peak = _peaks.pop(standby.pid, 0)
        # A warm process opens the job's log when it takes the job. One that died before that (its warm-up
        # under a tight memory limit, say) failed itself, not the job: run the job in a fresh process.
        if code is None or _stopping.is_set() or (folder / "job.log").exists():
            return _conclusion(settings, folder, code, limits[0], peak)
        logger.warning(
            "job %s: its warm process ended (status %s) before taking it; starting a fresh one", job_id, code
        )
    with open(folder / "job.log", "ab", opener=private_opener) as job_log:
        child = subprocess.Popen(
            _command(settings, folder, limits),
            stdin=subprocess.DEVNULL,
            stdout=job_log,
            stderr=job_log,
            start_new_session=True,
            cwd=folder,
            env=_child_env(),
        )
    code = _watch(settings, store, job_id, child)
    return _conclusion(settings, folder, code, limits[0], _peaks.pop(child.pid, 0))


def _watch(settings: Settings, store: JobStore, job_id: str, child: subprocess.Popen[bytes]) -> int | None:
    """Wait for the job's process (see _wait), keeping it where kill_all_children finds it."""
    with _children_lock:
        _children.add(child)
        stopping = _stopping.is_set()  # under the lock: kill_all_children either saw this child or set this
    if settings.workers > 1:  # other job slots may need a warm process before this job ends
        _start_standby(settings)
    try:
        if stopping:
            _kill(child)
        return _wait(settings, store, job_id, child)
    finally:
        with _children_lock:
            _children.discard(child)
        # With one job slot, the next job's process warms up only now: while the job ran on every core,
        # the warm-up's imports took one from it (about a second on 2 cores).
        _start_standby(settings)


def _conclusion(
    settings: Settings, folder: Path, code: int | None, memory_mb: int, peak_mb: int = 0
) -> JobError | None:
    if code is not None and code < 0 and _stopping.is_set():
        return JobError(code="interrupted", message="the server stopped while the job was running")
    if code is None:
        return JobError(code="timeout", message=f"the job ran longer than its {settings.job_timeout_s} s limit")
    return _outcome(code, folder, memory_mb, peak_mb)


def _hand_to_standby(settings: Settings, folder: Path, limits: tuple[int, int]) -> subprocess.Popen[bytes] | None:
    """Give the job to a warm process started with these settings and limits; None when there is none alive."""
    command = tuple(_command(settings, None, limits))
    while True:
        with _children_lock:
            found = next((entry for entry in _standby if entry[0] == command), None)
            if found is None:
                return None
            _standby.remove(found)
            _children.discard(found[1])
        child = found[1]
        if child.poll() is None and child.stdin is not None:
            try:
                child.stdin.write(f"{folder.resolve()}\n".encode())
                child.stdin.close()
                return child
            except OSError:  # it died just now
                pass
        _kill(child)


def _start_standby(settings: Settings) -> None:
    """Start a warm process for the next job with these settings, unless one waits already."""
    command = tuple(_command(settings, None))
    with _children_lock:
        if _stopping.is_set() or sum(entry[0] == command for entry in _standby) >= settings.workers:
            return
        child = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=_child_env(),
        )
        _standby.append((command, child))
        _children.add(child)  # killed on shutdown like a running job


# All a job's process sees of the server's environment: what Python and its libraries need to start and
# to format text (PYTHONPATH is rebuilt below). Nothing else passes (not COMPRESS_TOKEN, COMPRESS_TOKEN_FILE,
# COMPRESS_REDIS_URL, nor any other secret the server was given): the job parses untrusted models and is
# limited, not sandboxed.
CHILD_ENV = frozenset(
    {"PATH", "HOME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH"}
    | {"PYTHONHOME", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
)


def _child_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in CHILD_ENV if name in os.environ}
    # The child must import this very code (installed or not): put its root first on the path.
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    return env


def _wait(settings: Settings, store: JobStore, job_id: str, child: subprocess.Popen[bytes]) -> int | None:
    """The child's exit status, or None when it was killed at its deadline."""
    deadline = time.monotonic() + settings.job_timeout_s
    next_beat = 0.0
    while True:
        _peaks[child.pid] = max(_peaks.get(child.pid, 0), _address_space_peak_mb(child.pid))
        try:
            return child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now > deadline:
            _kill(child)
            return None
        if now >= next_beat:
            store.update(job_id, heartbeat_at=time.time())
            next_beat = now + settings.heartbeat_s


# The largest address space each job process reached (VmPeak, MB) as last read while it ran: a process that hits
# its limit inside native code (protobuf, ONNX Runtime) may die by SIGSEGV or SIGABRT instead of raising.
_peaks: dict[int, int] = {}


def _address_space_peak_mb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmPeak:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _kill(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)  # the whole group: ORT may have started helpers
    child.wait()


# What a job's log shows when its process ran out of memory somewhere it could not report it itself.
_OOM_IN_LOG = (b"MemoryError", b"Cannot allocate memory", b"std::bad_alloc", b"Failed to allocate memory")


_MAX_ERROR_BYTES = 64 << 10  # error.json is the job process's: it may be anything


def _outcome(code: int, folder: Path, memory_mb: int, peak_mb: int = 0) -> JobError | None:
    model = (folder / "output.onnx").exists() or (folder / "output.zip").exists()  # a zip: with external data
    if code == 0 and model and all((folder / f).exists() for f in ("report.json", "report.html")):
        return None
    try:
        data = json.loads(read_capped(folder, "error.json", _MAX_ERROR_BYTES))
        return JobError(code=str(data["code"]), message=str(data["message"]))  # JobError cuts both
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if code > 0 and _log_says_out_of_memory(folder):
        return JobError(code="out_of_memory", message=f"the job needed more than its {memory_mb} MB of memory")
    if code < 0 and _signal_name(code) != "SIGKILL" and peak_mb >= 0.9 * memory_mb:
        return JobError(
            code="out_of_memory",
            message=f"the job needed more than its {memory_mb} MB of memory (its process died by {_signal_name(code)} "
            f"at {peak_mb} MB of address space)",
        )
    if code < 0:
        name = _signal_name(code)
        hint = " (out of memory, or killed by an operator)" if name == "SIGKILL" else ""
        return JobError(code="crashed", message=f"the job's process was killed by {name}{hint}")
    if code == 0:
        return JobError(code="internal_error", message="the job's process ended without writing its results")
    return JobError(code="crashed", message=f"the job's process exited with status {code}")


def _signal_name(code: int) -> str:
    """The name of the signal a negative exit status stands for."""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _log_says_out_of_memory(folder: Path) -> bool:
    """True when the end of the job's log (its uncaught traceback) names an allocation failure."""
    try:
        with open_job_file(folder, "job.log") as log:  # not through a link (a FIFO would hang this thread)
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 8192))
            tail = log.read()
    except OSError:
        return False
    return any(marker in tail for marker in _OOM_IN_LOG)
