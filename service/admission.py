"""Who may start an upload: slots in total and per client, the queue's room, free disk, the declared size.

An upload holds a slot from its first byte to its last. The total bounds the server's open files and disk
writes; the per-client bound keeps one address (a handful of slow clients, say) from taking every slot. A
client is the address the server believes: its connection's, or behind a proxy in COMPRESS_FORWARDED_ALLOW_IPS
the one the proxy gives in X-Forwarded-For. Behind a proxy it does not trust every client has the proxy's address.
"""

from __future__ import annotations

import asyncio
import shutil

from starlette.requests import ClientDisconnect, Request

from service.errors import ApiError
from service.queue import JobQueue
from service.settings import Settings
from service.uploads import body_cap

__all__ = ["LINGER_MAX", "LINGER_S", "UploadSlots", "admit", "linger"]

RETRY_AFTER_S = 5


class UploadSlots:
    """Uploads in progress, in all and by client address (one per app, in `app.state.upload_slots`)."""

    def __init__(self) -> None:
        self.total = 0
        self.by_client: dict[str, int] = {}

    def take(self, client: str, settings: Settings) -> None:
        """Count one more upload from `client`, or refuse it: 429 past the client's share, 503 past the total."""
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        mine = self.by_client.get(client, 0)
        if mine >= settings.max_uploads_per_client:
            raise ApiError(
                429,
                "too_many_uploads",
                f"this client already has {mine} uploads in progress (at most {settings.max_uploads_per_client} "
                "at a time); retry when one has finished",
                retry,
            )
        if self.total >= settings.max_uploads_in_flight:
            raise ApiError(503, "busy", "too many uploads in progress; retry shortly", retry)
        self.total += 1
        self.by_client[client] = mine + 1

    def give_back(self, client: str) -> None:
        """The upload from `client` has ended (stored, refused or abandoned)."""
        self.total -= 1
        left = self.by_client.pop(client, 1) - 1
        if left > 0:
            self.by_client[client] = left


def client_of(request: Request) -> str:
    """The address an upload is counted against."""
    return request.client.host if request.client else "unknown"


def admit(request: Request, settings: Settings, queue: JobQueue) -> None:
    """Refuse an upload that could not be stored now (before any of its body is read); take its slot otherwise."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > body_cap(settings):
        raise ApiError(413, "upload_too_large", f"the upload is larger than {body_cap(settings) >> 20} MB in all")
    if queue.pending() >= settings.max_queued_jobs:
        raise ApiError(503, "busy", "the job queue is full; retry later", {"Retry-After": "30"})
    free = shutil.disk_usage(settings.data_dir).free
    if free < settings.min_free_disk_mb << 20:
        raise ApiError(507, "insufficient_storage", "the server is low on disk space; retry later")
    slots: UploadSlots = request.app.state.upload_slots
    slots.take(client_of(request), settings)


# A refused upload's body is read and thrown away for this long at most (nginx's "lingering close").
LINGER_S = 5.0
LINGER_MAX = 256  # refused uploads drained at the same time; each costs a coroutine and loopback/NIC bandwidth


async def linger(request: Request, settings: Settings) -> None:
    """Read and discard a refused upload's body, so that a client still sending it gets to read the refusal.

    Closing a connection with unread data makes the kernel send a reset, and a client still writing its body
    (one that did not send `Expect: 100-continue`) then sees a broken connection instead of the 503. A client
    that sent `Expect: 100-continue` has sent no body (reading it would ask for it), so nothing is read then.
    At most LINGER_S seconds, as many bytes as one upload may have, and a bounded number of refused uploads
    at a time are drained; past any of these the connection is simply closed.
    """
    state = request.app.state
    if "100-continue" in request.headers.get("expect", "").lower() or state.lingering >= LINGER_MAX:
        return
    budget = body_cap(settings)
    state.lingering += 1
    try:
        async with asyncio.timeout(LINGER_S):
            async for chunk in request.stream():
                budget -= len(chunk)
                if budget < 0:
                    break
    except (TimeoutError, ClientDisconnect):
        pass
    finally:
        state.lingering -= 1
