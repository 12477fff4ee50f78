"""`onnx-compress serve` (API + embedded worker) and `onnx-compress worker` (queue consumer only)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the service's subcommands on the onnx-compress parser."""
    serve = sub.add_parser("serve", help="run the HTTP service and web form (embedded worker by default)")
    serve.add_argument("--host", help="bind address (COMPRESS_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (COMPRESS_PORT, default 8000)")
    serve.add_argument("--data-dir", type=Path, help="jobs and queue (COMPRESS_DATA_DIR, default ./data)")
    serve.add_argument("--no-worker", action="store_true", help="API only; jobs run in `onnx-compress worker`")
    serve.set_defaults(func=_serve)
    worker = sub.add_parser("worker", help="consume the job queue (for scale-out next to `serve --no-worker`)")
    worker.add_argument("--data-dir", type=Path, help="jobs and queue (COMPRESS_DATA_DIR)")
    worker.set_defaults(func=_worker)


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from service.settings import Settings

    overrides = {
        k: v
        for k, v in (
            ("host", getattr(args, "host", None)),
            ("port", getattr(args, "port", None)),
            ("data_dir", args.data_dir),
        )
        if v is not None
    }
    if getattr(args, "no_worker", False):
        overrides["embedded_worker"] = False
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.http_server import server_options
    from service.main import create_app

    settings = _settings(args)
    settings.check_bind()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), log_level="info", **server_options(settings))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from service.queue import JobQueue, start_consumer
    from service.worker import kill_all_children

    settings = _settings(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    queue = JobQueue(settings)
    queue.recover()
    consumer, thread = start_consumer(queue, settings.workers)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    consumer.stop()
    kill_all_children()
    consumer.stop(graceful=True)  # let the worker threads record their jobs as interrupted
    thread.join(timeout=10)
    return 0
