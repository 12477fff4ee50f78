"""How uvicorn serves the app: its options, and an HTTP/1.1 protocol that closes connections whose head never ends.

uvicorn has no timeout for a request head: its keep-alive timer is cancelled by the first byte that arrives,
so a client that sends a few bytes of a request line, or one header line a minute, holds its connection (and
a file descriptor) for as long as it likes. `head_timeout_protocol` subclasses uvicorn's h11 protocol: from the
moment a connection opens, and again after each response, the next request's head must arrive whole within
`header_timeout_s`; otherwise the connection is answered 408 (when part of a head had arrived) and closed.
Bodies are paced by the routes that read them (service/uploads.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from service.settings import Settings

__all__ = ["HeadTimeoutH11Protocol", "head_timeout_protocol", "server_options"]

logger = logging.getLogger(__name__)


def _answer_408(seconds: float) -> bytes:
    body = json.dumps(
        {"error": {"code": "header_timeout", "message": f"the request head did not arrive within {seconds:g} s"}}
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (see the module docstring)."""

    header_timeout_s: ClassVar[float] = 20.0

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's head."""
        super().connection_made(transport)
        self._arm_head_timer(None)

    def on_response_complete(self) -> None:
        """Start the clock for the next request's head (keep-alive, or a body the app did not read)."""
        finished = self.cycle  # a pipelined request may start inside super(): that one is not waited for
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer(finished)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock."""
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self, waiting_after: RequestResponseCycle | None) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out, waiting_after)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, waiting_after: RequestResponseCycle | None) -> None:
        self._head_timer = None
        if self.cycle is not waiting_after or self.transport.is_closing():
            return  # a request began in time: its body, if any, is paced by the route that reads it
        partial, _ = self.conn.trailing_data  # bytes of a head that h11 is still waiting to complete
        if partial:
            client = self.client[0] if self.client else "?"
            logger.info("%s: a request head did not arrive within %g s; closing", client, self.header_timeout_s)
            self.transport.write(_answer_408(self.header_timeout_s))
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def head_timeout_protocol(header_timeout_s: float) -> type[HeadTimeoutH11Protocol]:
    """The protocol class for uvicorn's `http=` option, with this head deadline."""
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,), {"header_timeout_s": header_timeout_s})


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` that every server of this app uses."""
    return {
        "host": settings.host,
        "port": settings.port,
        "http": head_timeout_protocol(settings.header_timeout_s),
        "proxy_headers": False,
        "server_header": False,
    }
