"""Who may call what: the cross-site check and authentication, in front of every route and before any body is read.

`AuthGate` is an ASGI middleware, so a route added later is covered without doing anything, and no route (or
FastAPI parsing a form parameter) can read or spool a body from a client that has not authenticated. Only a few
routes are public: /healthz, the login page and its style sheet, and POST /login and /logout, which read at most
a small urlencoded field. Every state-changing request, token or not, is refused when it comes from another site.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import urllib.parse
from collections.abc import Iterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ApiError
from service.sessions import LoginThrottle, SessionStore, client_key
from service.settings import Settings

__all__ = ["SESSION_COOKIE", "Auth", "AuthGate", "cross_site", "log_in", "log_out", "set_session_cookie"]

SESSION_COOKIE = "compress_session"
LOGIN_BODY_MAX = 4096  # the login form's one urlencoded field
LOGIN_BODY_S = 10.0
LOGIN_READS_PER_CLIENT = 4
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PUBLIC = frozenset(
    {
        ("GET", "/healthz"),
        ("HEAD", "/healthz"),
        ("GET", "/login"),
        ("HEAD", "/login"),
        ("POST", "/login"),
        ("POST", "/logout"),
        ("GET", "/static/style.css"),  # the login page's looks
        ("HEAD", "/static/style.css"),
        ("GET", "/static/favicon.svg"),  # and its icon
        ("HEAD", "/static/favicon.svg"),
        ("GET", "/favicon.ico"),
        ("HEAD", "/favicon.ico"),
    }
)
# Unauthenticated requests for these get a JSON 401; for anything else (the web pages) a redirect to /login.
_NOT_PAGES = ("/api/", "/form/", "/openapi.json", "/docs", "/static/", "/docs-assets/")


class Auth:
    """One app's token, login sessions and wrong-token throttle."""

    def __init__(self, settings: Settings) -> None:
        self.token = settings.token
        lifetime_s = settings.session_hours * 3600
        self.sessions = SessionStore(settings.data_dir / "sessions", settings.token, lifetime_s)
        self.throttle = LoginThrottle()
        self._reading: dict[str, int] = {}

    def token_matches(self, given: str) -> bool:
        """Constant-time comparison with the configured token."""
        if self.token is None:
            return True
        return secrets.compare_digest(given.strip().encode(), self.token.get_secret_value().encode())

    @contextlib.contextmanager
    def login_slot(self, key: str) -> Iterator[None]:
        """At most LOGIN_READS_PER_CLIENT login bodies read at a time per client (429 past that)."""
        if self._reading.get(key, 0) >= LOGIN_READS_PER_CLIENT:
            raise ApiError(429, "too_many_requests", "too many logins in progress from this address", _retry(5))
        self._reading[key] = self._reading.get(key, 0) + 1
        try:
            yield
        finally:
            self._reading[key] -= 1
            if not self._reading[key]:
                del self._reading[key]

    def check(self, request: Request) -> bool:
        """True when the request carries the token (Bearer header) or a live session cookie.

        A wrong Bearer token counts against the client's address; while the address is locked out its
        tokens are not even compared (ApiError 429).
        """
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            key = _client(request)
            wait = self.throttle.retry_after(key)
            if wait:
                raise _too_many(wait)
            if self.token_matches(header[7:]):
                return True
            self.throttle.failed(key)
            return False
        return self.sessions.valid(request.cookies.get(SESSION_COOKIE, ""))


class AuthGate:
    """ASGI middleware: the cross-site check, then authentication, before the app sees the request."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a refusal without reading the body, or hand the request on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send)  # the body is never read
            return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> Response | None:
        method, path = request.method, request.scope["path"]
        if method not in _SAFE_METHODS and (reason := cross_site(request)) is not None:
            return _json(ApiError(403, "cross_site", reason))
        if self.auth.token is None or (method, path) in _PUBLIC:
            request.state.authenticated = self.auth.token is None
            return None
        try:
            ok = self.auth.check(request)
        except ApiError as e:
            return _json(e)
        request.state.authenticated = ok
        if ok:
            return None
        if path.startswith(_NOT_PAGES):
            headers = {"WWW-Authenticate": "Bearer"}
            return _json(ApiError(401, "unauthorized", "a valid bearer token is required", headers))
        return RedirectResponse("/login", status_code=303, headers={"Cache-Control": "no-store"})


def cross_site(request: Request) -> str | None:
    """Why a state-changing request must be refused as cross-site, or None.

    Refused: `Sec-Fetch-Site` cross-site or same-site, or an `Origin` other than this server's own scheme, host
    and port (`null` too, unless the browser says same-origin). Clients that send neither header (curl, scripts,
    the CLI) are not browsers acting for a page.
    """
    site = request.headers.get("sec-fetch-site", "").strip().lower()
    if site in ("cross-site", "same-site"):
        return f"a {site} request may not change anything here (Sec-Fetch-Site)"
    origin = request.headers.get("origin")
    if origin is None or (origin.strip().lower() == "null" and site == "same-origin"):
        return None  # a same-origin page under a no-referrer policy sends "null"; only a browser sets Sec-Fetch-Site
    scheme = request.scope["scheme"]
    own = _origin(scheme, request.headers.get("host", ""))
    given = origin.strip().lower()
    if given.count("://") == 1:
        given_scheme, _, netloc = given.partition("://")
        given = _origin(given_scheme, netloc)
    if given == own:
        return None
    hint = ""
    if given == _origin("https", request.headers.get("host", "")) and scheme == "http":
        hint = "; behind a TLS proxy, add the proxy's address to COMPRESS_FORWARDED_ALLOW_IPS"
    return f"the request comes from another origin than this server's (Origin){hint}"


def _origin(scheme: str, netloc: str) -> str:
    netloc = netloc.strip().lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return f"{scheme}://{netloc}"


async def log_in(request: Request, auth: Auth) -> str | None:
    """Check the login form's token: a new session id, or None for a wrong token.

    Raises ApiError: 429 while this address is locked out (before any of the body is read), 415 for anything
    but a urlencoded form, 413 past LOGIN_BODY_MAX bytes, 408 past LOGIN_BODY_S seconds.
    """
    key = _client(request)
    wait = auth.throttle.retry_after(key)
    if wait:
        raise _too_many(wait)
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise ApiError(415, "unsupported_media_type", "send the token as a urlencoded form field named 'token'")
    length = request.headers.get("content-length", "0")
    if not length.isdigit() or int(length) > LOGIN_BODY_MAX:
        raise ApiError(413, "body_too_large", f"the login form is at most {LOGIN_BODY_MAX} bytes")
    with auth.login_slot(key):
        body = await _read_small_body(request)
    try:
        fields = urllib.parse.parse_qs(body.decode("ascii", "replace"), errors="replace", max_num_fields=4)
    except ValueError as e:
        raise ApiError(400, "bad_request", "the login form has too many fields") from e
    if not auth.token_matches(fields.get("token", [""])[0]):
        auth.throttle.failed(key)
        return None
    return auth.sessions.create()


async def _read_small_body(request: Request) -> bytes:
    body = bytearray()
    try:
        async with asyncio.timeout(LOGIN_BODY_S):
            async for chunk in request.stream():
                body += chunk
                if len(body) > LOGIN_BODY_MAX:
                    raise ApiError(413, "body_too_large", f"the login form is at most {LOGIN_BODY_MAX} bytes")
    except TimeoutError as e:
        raise ApiError(408, "body_timeout", f"the login form took longer than {LOGIN_BODY_S:.0f} s") from e
    except ClientDisconnect as e:
        raise ApiError(400, "bad_request", "the client went away in the middle of the login form") from e
    return bytes(body)


def set_session_cookie(response: Response, request: Request, session_id: str, auth: Auth) -> None:
    """The session cookie: HttpOnly, SameSite=Strict, Secure when the request came over https."""
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=int(auth.sessions.lifetime_s),
        httponly=True,
        samesite="strict",
        path="/",
        secure=request.scope["scheme"] == "https",
    )


def log_out(request: Request, response: Response, auth: Auth) -> None:
    """End the request's session on the server and clear its cookie."""
    auth.sessions.revoke(request.cookies.get(SESSION_COOKIE, ""))
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=request.scope["scheme"] == "https"
    )


def _client(request: Request) -> str:
    return client_key(request.client.host if request.client else None)


def _retry(seconds: int) -> dict[str, str]:
    return {"Retry-After": str(seconds)}


def _too_many(wait: int) -> ApiError:
    return ApiError(
        429, "too_many_attempts", f"too many wrong tokens from this address: retry in {wait} s", _retry(wait)
    )


def _json(error: ApiError) -> JSONResponse:
    body = {"error": {"code": error.code, "message": error.message}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)
