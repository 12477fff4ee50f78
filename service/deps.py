"""FastAPI dependencies: settings, the queue (with its job store), and the authentication check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import ApiError
from service.queue import JobQueue
from service.settings import Settings, get_settings

__all__ = ["QueueDep", "SettingsDep", "require_token", "token_ok"]

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_queue(request: Request) -> JobQueue:
    """The queue opened by the app's lifespan."""
    queue: JobQueue = request.app.state.queue
    return queue


QueueDep = Annotated[JobQueue, Depends(get_queue)]


def token_ok(request: Request, settings: Settings) -> bool:
    """True when no token is configured, or the auth gate found the token or a live session on the request.

    The gate (service.auth.AuthGate) has already refused unauthenticated requests to anything but the public
    routes; this is the same verdict, for routes that show something different to a logged-in user.
    """
    return settings.token is None or getattr(request.state, "authenticated", False) is True


def require_token(request: Request, settings: SettingsDep) -> None:
    """Refuse requests without the configured token (401); a second line behind the gate."""
    if not token_ok(request, settings):
        raise ApiError(401, "unauthorized", "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
