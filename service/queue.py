"""The job queue: Huey, on a SQLite file by default or on Redis when COMPRESS_REDIS_URL is set."""

from __future__ import annotations

import logging
import threading
from typing import Any

from huey import RedisHuey, SqliteHuey
from huey.api import Huey
from huey.consumer import Consumer

from service.jobs import JobStore
from service.settings import Settings
from service.worker import accept_jobs, run_job, worker_is_dead

__all__ = ["JobQueue", "start_consumer"]

logger = logging.getLogger(__name__)

_START_LIMIT_S = 120.0  # the longest start-up waits for the consumer's threads (a bound, not an expected time)


class JobQueue:
    """A Huey instance with the one task this service has: run a job by id."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore(settings.jobs_dir)
        if settings.redis_url:
            self.huey: Huey = RedisHuey("onnx-compress", url=settings.redis_url, results=False)
        else:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            self.huey = SqliteHuey("onnx-compress", filename=str(settings.data_dir / "queue.db"), results=False)
        self._task = self.huey.task(name="run_job")(self._run)
        self._maintenance = self.huey.periodic_task(_every_ten_minutes, name="maintenance")(self._maintain)

    def enqueue(self, job_id: str) -> None:
        """Put a job on the queue (running it twice is harmless: only one worker can claim it)."""
        self._task(job_id)

    def pending(self) -> int:
        """Jobs waiting in the queue."""
        return int(self.huey.pending_count())

    def recover(self) -> None:
        """After a restart: fail jobs whose worker died and re-enqueue queued jobs the queue may have lost."""
        queued = self.store.recover(stale_after=self.settings.heartbeat_s * 4, is_dead=worker_is_dead)
        waiting = set(self._pending_job_ids())
        for job_id in queued:
            if job_id not in waiting:
                self.enqueue(job_id)

    def _pending_job_ids(self) -> list[str]:
        ids = []
        for task in self.huey.pending():
            args = getattr(task, "args", ()) or ()
            if args:
                ids.append(str(args[0]))
        return ids

    def _run(self, job_id: str) -> None:
        run_job(self.settings, self.store, job_id)

    def _maintain(self) -> None:
        removed = self.store.purge(self.settings.retention_hours * 3600)
        if removed:
            logger.info("retention: removed %d old jobs", removed)
        self.store.recover(stale_after=self.settings.heartbeat_s * 4, is_dead=worker_is_dead)


def _every_ten_minutes(timestamp: Any) -> bool:
    return bool(timestamp.minute % 10 == 0)


class _EmbeddedConsumer(Consumer):  # type: ignore[misc]
    """Huey's consumer run in a thread of this process, which tells when its scheduler and workers have started."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()

    def start(self) -> None:
        """Start the scheduler and worker threads, then set `started`; set it too when starting them failed.

        A graceful stop joins those threads, and joining a thread not yet started raises: a service shut down right
        after start-up (the consumer thread not yet this far, on a loaded host) failed its shutdown that way.
        """
        try:
            super().start()
        finally:
            self.started.set()  # a consumer thread dying here must not leave start-up waiting

    def _set_signal_handlers(self) -> None:
        # The embedding process (uvicorn) owns the signals; huey's handlers only work in the main thread.
        pass


def start_consumer(queue: JobQueue, workers: int) -> tuple[Consumer, threading.Thread]:
    """Start consuming in this process (worker threads that each supervise one job process at a time).

    Returns once huey's scheduler and worker threads have started (a graceful stop joins them), or starting them
    failed, or after _START_LIMIT_S at the most.
    """
    accept_jobs(queue.settings)
    consumer = _EmbeddedConsumer(
        queue.huey,
        workers=workers,
        worker_type="thread",
        periodic=True,
        check_worker_health=True,
        shutdown_timeout=30,
        # An idle consumer polls at most this far apart (Huey's default, 10 s, leaves a new job waiting).
        # On SQLite a poll is one small query; Redis storage blocks on the list instead and wakes at once.
        max_delay=0.25,
    )
    thread = threading.Thread(target=consumer.run, name="huey-consumer", daemon=True)
    thread.start()
    if not consumer.started.wait(_START_LIMIT_S):
        logger.warning("the job consumer's threads had not started after %.0f s", _START_LIMIT_S)
    threading.Thread(target=_reap, args=(queue, consumer), name="job-reaper", daemon=True).start()
    return consumer, thread


def _reap(queue: JobQueue, consumer: Consumer) -> None:
    # A worker killed outright (SIGKILL, OOM killer, a lost host) leaves its job "running"; every live
    # worker looks for such jobs every few heartbeats and ends them as failed ("interrupted").
    interval = queue.settings.heartbeat_s * 2
    while not consumer.stop_flag.wait(interval):
        try:
            queue.store.recover(stale_after=queue.settings.heartbeat_s * 4, is_dead=worker_is_dead)
        except Exception:
            logger.exception("looking for interrupted jobs failed")
