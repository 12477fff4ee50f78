"""A service stopped right after it starts shuts its job consumer down cleanly, however late huey's threads start."""

from __future__ import annotations

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
    start = Consumer.start

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
