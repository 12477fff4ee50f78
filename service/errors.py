"""Errors as the client sees them: JSON {"error": {"code", "message"}} with a stable code, never a path."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.jobs import MAX_MESSAGE_CHARS, bounded_text

__all__ = ["ApiError", "install_error_handlers"]

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered with `status` and a JSON body; `headers` e.g. Retry-After."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        message = bounded_text(message, MAX_MESSAGE_CHARS)  # it may quote the request or an upload
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _body(code: str, message: str, **extra: object) -> dict[str, object]:
    # Every error answer goes through here: a message quoting the request or an upload stays short.
    return {"error": {"code": code, "message": bounded_text(message, MAX_MESSAGE_CHARS), **extra}}


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the JSON shape above."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [bounded_text(p, 100) for p in e.get("loc", ())[:10]], "msg": bounded_text(e.get("msg", ""), 300)}
            for e in exc.errors()[:20]
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        message = f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else str(first["msg"])
        return JSONResponse(_body("invalid_request", message, details=details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 400: "bad_request"}
        return JSONResponse(
            _body(codes.get(exc.status_code, "http_error"), str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            _body("internal_error", "unexpected server error; the server log has details"), status_code=500
        )
