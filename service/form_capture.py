"""Keep the plan of a refused form upload, so the form can show it again.

`create_job` consumes the request body as a stream; `PlanCapture` sits between it and the server, copying the
first bytes that pass. The form puts the plan before the files, so it is in that first part.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Message

__all__ = ["PlanCapture"]

_PLAN_CAPTURE_BYTES = 128 * 1024  # the plan field is at most 64 KiB and comes first in the form


class PlanCapture:
    """The first bytes of a request body, kept so the plan can be shown again when the upload is refused."""

    def __init__(self, request: Request) -> None:
        self._outer = request
        self._head = bytearray()
        self.request = Request(request.scope, self._receive)

    async def _receive(self) -> Message:
        message = await self._outer.receive()
        room = _PLAN_CAPTURE_BYTES - len(self._head)
        if message["type"] == "http.request" and room > 0:
            self._head.extend(message.get("body", b"")[:room])
        return message

    def plan(self) -> str | None:
        """The plan field's text, if it arrived whole within the captured bytes."""
        _, params = parse_options_header(self._outer.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if not boundary:
            return None
        found: dict[str, str] = {}
        state: dict[str, Any] = {"field": bytearray(), "value": bytearray(), "name": "", "data": bytearray()}

        def header_end() -> None:
            if bytes(state["field"]).lower() == b"content-disposition":
                state["name"] = parse_options_header(bytes(state["value"]))[1].get(b"name", b"").decode()
            state["field"], state["value"] = bytearray(), bytearray()

        def part_end() -> None:
            if state["name"] == "plan":
                found["plan"] = bytes(state["data"]).decode("utf-8", "replace")
            state["name"], state["data"] = "", bytearray()

        callbacks = {
            "on_header_field": lambda d, s, e: state["field"].extend(d[s:e]),
            "on_header_value": lambda d, s, e: state["value"].extend(d[s:e]),
            "on_header_end": header_end,
            "on_part_data": lambda d, s, e: state["data"].extend(d[s:e]) if state["name"] == "plan" else None,
            "on_part_end": part_end,
        }
        # A body cut off by the capture or malformed by the client simply has no plan to show again.
        with contextlib.suppress(Exception):
            MultipartParser(boundary, callbacks).write(bytes(self._head))  # type: ignore[arg-type]
        return found.get("plan")
