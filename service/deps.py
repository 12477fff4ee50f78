"""FastAPI dependencies: settings, the queue (with its job store), and the optional bearer token."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from service.errors import ApiError
from service.queue import JobQueue
from service.settings import Settings, get_settings

__all__ = ["TOKEN_COOKIE", "QueueDep", "SettingsDep", "require_token", "token_ok"]

TOKEN_COOKIE = "compress_token"

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_queue(request: Request) -> JobQueue:
    """The queue opened by the app's lifespan."""
    queue: JobQueue = request.app.state.queue
    return queue


QueueDep = Annotated[JobQueue, Depends(get_queue)]


def token_ok(request: Request, settings: Settings) -> bool:
    """True when no token is configured, or the request carries it (Bearer header or the login cookie)."""
    if settings.token is None:
        return True
    expected = settings.token.get_secret_value().encode()
    header = request.headers.get("authorization", "")
    given = header[7:] if header[:7].lower() == "bearer " else request.cookies.get(TOKEN_COOKIE, "")
    return secrets.compare_digest(given.encode(), expected)


def require_token(request: Request, settings: SettingsDep) -> None:
    """Refuse requests without the configured token (401)."""
    if not token_ok(request, settings):
        raise ApiError(401, "unauthorized", "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
