"""The FastAPI application: `create_app()` wires settings, the queue, the API, the web form and security headers."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import fastapi_offline
from fastapi import Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from service import api, web
from service.admission import UploadSlots
from service.auth import Auth, AuthGate
from service.deps import require_token
from service.errors import install_error_handlers
from service.queue import JobQueue, start_consumer
from service.settings import Settings, get_settings
from service.worker import kill_all_children

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-src 'self'; frame-ancestors 'self'; base-uri 'none'"
)


def create_app(settings: Settings | None = None, *, embedded_worker: bool | None = None) -> FastAPI:
    """Build the app. `settings` defaults to the environment; `embedded_worker` to settings.embedded_worker."""
    settings = settings or get_settings()
    run_worker = settings.embedded_worker if embedded_worker is None else embedded_worker

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue = JobQueue(settings)
        queue.recover()
        app.state.queue = queue
        app.state.upload_slots = UploadSlots()  # uploads in progress, in all and per client
        app.state.lingering = 0  # refused uploads whose bodies are being read and discarded
        consumer = start_consumer(queue, settings.workers)[0] if run_worker else None
        try:
            yield
        finally:
            if consumer is not None:
                consumer.stop()  # take no new task
                kill_all_children()  # running jobs end as failed ("interrupted"); queued ones stay queued
                consumer.stop(graceful=True)  # wait until the worker threads have recorded that

    app = FastAPI(
        title="onnx-compress",
        version="0.1.0",
        lifespan=lifespan,
        description="Compress ONNX models (prune, SVD, int8) and measure the result with ONNX Runtime.",
        docs_url=None,  # served by _add_docs, behind the token
        redoc_url=None,
        openapi_url=None,
    )
    app.dependency_overrides[get_settings] = lambda: settings
    install_error_handlers(app)
    # Middleware added first runs last: ProxyHeaders, security headers, Host allow-list, then the auth gate.
    app.state.auth = Auth(settings)
    app.add_middleware(AuthGate, auth=app.state.auth)
    if "*" not in settings.allowed_hosts:
        # Starlette compares IPv6 literals with their brackets ("[::1]"); accept them written either way.
        hosts = [f"[{h}]" if ":" in h and not h.startswith("[") else h for h in settings.allowed_hosts]
        app.add_middleware(JsonTrustedHostMiddleware, allowed_hosts=hosts)

    @app.middleware("http")
    async def security_headers(request: Request, call_next) -> Response:  # type: ignore[no-untyped-def]
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        # Not "no-referrer": with it browsers send `Origin: null` on the form's own posts (see service.auth).
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "SAMEORIGIN"
        return response

    # X-Forwarded-Proto/-For from these proxies only: https behind a TLS proxy (Secure cookie, Origin check)
    # and the real client address (login throttle).
    app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.forwarded_allow_ips)
    app.include_router(api.health)
    app.include_router(api.router)
    app.include_router(web.router)
    web.mount_static(app)
    _add_docs(app)
    return app


class JsonTrustedHostMiddleware(TrustedHostMiddleware):
    """Starlette's Host allow-list, answering a refused Host in the API's JSON error shape (code bad_host).

    Starlette refuses with a plain-text 400; the app itself only ever answers JSON, so a text/plain 400 can
    only be that refusal and is rewritten here.
    """

    _BODY = json.dumps(
        {"error": {"code": "bad_host", "message": "the Host header is not one this server serves"}}
    ).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = False

        async def send_json(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] == 400:
                headers = dict(message.get("headers", []))
                refused = headers.get(b"content-type", b"").startswith(b"text/plain")
                if refused:
                    message = {
                        **message,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(self._BODY)),
                        ],
                    }
            elif message["type"] == "http.response.body" and refused:
                message = {**message, "body": self._BODY, "more_body": False}
            await send(message)

        await super().__call__(scope, receive, send_json)


def _add_docs(app: FastAPI) -> None:
    """/openapi.json and /docs (Swagger UI), behind the token like every route but /healthz (see service.auth).

    Swagger UI 5 (which reads the OpenAPI 3.1 that FastAPI writes; 4.x renders nothing) is served by the app
    from the fastapi-offline package, not from a CDN, so the docs work offline; its one inline start-up script
    is allowed by its hash.
    """
    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_token)])
    def docs() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - API docs",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/favicon.ico",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from the online validator
        )
        html = bytes(page.body).decode()
        inline = "".join(f" 'sha256-{_sha256(m)}'" for m in re.findall(r"<script>(.*?)</script>", html, re.S))
        page.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'self'{inline}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
        )
        return page


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
