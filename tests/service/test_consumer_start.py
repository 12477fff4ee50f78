"""A service stopped right after it starts shuts its job consumer down cleanly, however late huey's threads start."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from huey.consumer import Consumer

from service import queue as queue_module
from service.queue import JobQueue, start_consumer
from service.worker import kill_all_children

from service_harness import make_settings


def test_a_graceful_stop_right_after_start_up_joins_only_started_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a loaded host the consumer thread can be slow to start its worker threads; here it is made slow.
    start = queue_module._EmbeddedConsumer.start

    def late_start(self: Any) -> None:
        time.sleep(1.0)
        start(self)

    monkeypatch.setattr(queue_module._EmbeddedConsumer, "start", late_start)
    jobs = JobQueue(make_settings(tmp_path / "data", redis_url=None))
    consumer, thread = start_consumer(jobs, 2)
    try:
        consumer.stop()
        consumer.stop(graceful=True)  # joined a worker thread not yet started: RuntimeError
    finally:
        kill_all_children()
    thread.join(60)
    assert not thread.is_alive()


def test_start_up_returns_when_the_consumer_thread_dies_starting_its_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_start(self: Any) -> None:
        raise RuntimeError("cannot start the scheduler")

    monkeypatch.setattr(Consumer, "start", failing_start)  # huey's own start, which ours wraps
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    jobs = JobQueue(make_settings(tmp_path / "data", redis_url=None))
    consumer, thread = start_consumer(jobs, 1)  # without the event set on failure: waits its whole bound
    try:
        assert consumer.started.is_set()
        thread.join(60)
        assert not thread.is_alive()
        assert [str(e) for e in died] == ["cannot start the scheduler"]
    finally:
        consumer.stop()
