"""Attacks on authentication: bodies read before auth, empty tokens, cross-site requests, the login cookie, assets.

Each test drives the real app (TestClient over its ASGI interface, lifespan started, no worker unless a job
has to run). `Counting` sits between the client and the app and counts the body bytes the app pulls, which is
what a server would have to receive (and Starlette's form parser would spool) before answering.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.main import create_app
from service.settings import Settings

from service_harness import (
    MULTIPART,
    ServiceClient,
    error_of,
    job_body,
    make_settings,
    mlp_bytes,
    plan_json,
    running_service,
    submit,
    wait_for_job,
)

TOKEN = "s3cret-token-for-the-auth-tests"
BIG = 8 << 20
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
EVIL = "https://evil.example"


class Counting:
    """ASGI wrapper counting the request body bytes the app reads."""

    def __init__(self, app: ASGIApp) -> None:
        self.app, self.pulled = app, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            self.pulled += len(message.get("body", b""))
            return message

        await self.app(scope, counted if scope["type"] == "http" else receive, send)


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[tuple[ServiceClient, Counting]]:
    """A token-protected app without a worker, behind a body counter."""
    settings = make_settings(tmp_path / "data", token=SecretStr(TOKEN))
    counting = Counting(create_app(settings, embedded_worker=False))
    with ServiceClient(counting, settings.data_dir) as client:
        yield client, counting


def _cookie(response: Any) -> str:
    match = re.search(r"compress_session=([^;]+)", response.headers.get("set-cookie", ""))
    assert match, response.headers
    return match.group(1)


# --- class 2: no body is read before authentication -----------------------------------------------------


def test_login_reads_only_a_small_urlencoded_field(protected: tuple[ServiceClient, Counting]) -> None:
    client, counting = protected
    body = job_body(b"\0" * BIG, plan_json({"kind": "quantize"}))
    response = client.post("/login", content=body, headers=MULTIPART)
    assert response.status_code == 415 and error_of(response)["code"] == "unsupported_media_type"
    assert counting.pulled == 0, f"{counting.pulled} bytes of a multipart body read before any credential"
    response = client.post("/login", content=b"token=" + b"a" * BIG, headers=FORM)
    assert response.status_code == 413 and error_of(response)["code"] == "body_too_large"
    assert counting.pulled == 0
    response = client.post("/login", content=b"token=wrong&x=" + b"a" * 5000, headers=FORM | {"Content-Length": "x"})
    assert response.status_code in (400, 413), response.text
    assert client.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 303


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/jobs"),
        ("POST", "/jobs"),
        ("DELETE", "/api/jobs/0123456789abcdef0123456789abcdef"),
        ("PUT", "/api/jobs"),
        ("PATCH", "/"),
        ("POST", "/logout/x"),
        ("POST", "/docs-assets/swagger-ui.css"),
        ("POST", "/static/style.css"),
        ("POST", "/no-such-route"),
    ],
)
def test_no_route_reads_a_body_before_authentication(
    protected: tuple[ServiceClient, Counting], method: str, path: str
) -> None:
    client, counting = protected
    body = job_body(b"\0" * BIG, plan_json({"kind": "quantize"}))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": f"compress_session={'A' * 43}"}):
        response = client.request(method, path, content=body, headers=MULTIPART | headers, follow_redirects=False)
        assert response.status_code in (303, 401), (headers, response.text[:200])
        assert counting.pulled == 0, f"{method} {path} read {counting.pulled} bytes before authentication"
    assert list((client.data_dir / "jobs").iterdir()) == []


# --- class 4: an empty token never disables authentication -----------------------------------------------


@pytest.mark.parametrize("value", ["", " ", "\t\n "])
def test_empty_or_blank_token_is_refused_at_start_up(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    with pytest.raises(ValidationError, match="COMPRESS_TOKEN is empty or only whitespace"):
        Settings(token=SecretStr(value))
    monkeypatch.setenv("COMPRESS_TOKEN", value)
    monkeypatch.setenv("COMPRESS_HOST", "0.0.0.0")
    with pytest.raises(ValidationError, match="COMPRESS_TOKEN is empty"):
        Settings()


# --- class 5: state-changing requests from other sites are refused, token or not --------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": EVIL},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://testserver.evil.example"},
        {"Origin": "http://testserver:8080"},
        {"Origin": "https://testserver"},
        {"Origin": EVIL, "Sec-Fetch-Site": "same-origin"},
    ],
)
def test_cross_site_requests_cannot_change_anything(tmp_path: Path, headers: dict[str, str]) -> None:
    with running_service(make_settings(tmp_path / "data"), embedded_worker=False) as client:
        model, plan = mlp_bytes(), plan_json({"kind": "quantize"})
        kept = submit(client, model, plan)
        assert kept.status_code == 202, kept.text
        attempts = [
            submit(client, model, plan, headers=headers),
            client.post("/jobs", content=job_body(model, plan), headers=MULTIPART | headers),
            client.delete(f"/api/jobs/{kept.json()['id']}", headers=headers),
            client.post("/logout", headers=headers),
            client.post("/login", data={"token": "x"}, headers=headers),
        ]
        for response in attempts:
            assert response.status_code == 403, response.text[:300]
            assert error_of(response)["code"] == "cross_site"
        assert [job["id"] for job in client.get("/api/jobs").json()] == [kept.json()["id"]]


def test_same_origin_and_headerless_clients_still_work(tmp_path: Path) -> None:
    with running_service(make_settings(tmp_path / "data"), embedded_worker=False) as client:
        model, plan = mlp_bytes(), plan_json({"kind": "quantize"})
        for headers in (
            {},
            {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
            {"Origin": "http://testserver:80"},
            {"Sec-Fetch-Site": "none"},
            {"Origin": "null", "Sec-Fetch-Site": "same-origin"},  # a same-origin page with a no-referrer policy
        ):
            assert submit(client, model, plan, headers=headers).status_code == 202, headers
        page = client.post("/jobs", content=job_body(model, plan), headers=MULTIPART | {"Origin": "http://testserver"})
        assert page.status_code == 200 and re.search(r"/jobs/[0-9a-f]{32}$", str(page.url))


def test_cross_site_refused_with_a_token_too(protected: tuple[ServiceClient, Counting]) -> None:
    client, counting = protected
    auth = {"Authorization": f"Bearer {TOKEN}", "Origin": EVIL}
    response = client.post("/api/jobs", content=job_body(b"\0" * BIG, "{}"), headers=MULTIPART | auth)
    assert response.status_code == 403 and error_of(response)["code"] == "cross_site"
    assert counting.pulled == 0


# --- class 7: the login cookie is a revocable, expiring server-side session -------------------------------


def test_login_cookie_is_a_revocable_session_not_the_token(protected: tuple[ServiceClient, Counting]) -> None:
    client, _ = protected
    response = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert response.status_code == 303
    session = _cookie(response)
    cookie = response.headers["set-cookie"].lower()
    assert TOKEN not in response.headers["set-cookie"] and len(session) >= 43
    assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=43200" in cookie
    assert "secure" not in cookie  # plain http from a client that is no trusted proxy
    stored = list((client.data_dir / "sessions").iterdir())
    assert len(stored) == 1 and session not in stored[0].name and stored[0].stat().st_mode & 0o077 == 0
    assert session.encode() not in stored[0].read_bytes() and TOKEN.encode() not in stored[0].read_bytes()
    client.cookies.clear()
    assert client.get("/api/jobs", headers={"Cookie": f"compress_token={TOKEN}"}).status_code == 401
    assert client.get("/api/jobs", headers={"Cookie": f"compress_session={session}"}).status_code == 200
    # Another API replica on the same data directory takes the session.
    replica_settings = make_settings(client.data_dir, token=SecretStr(TOKEN))
    with running_service(replica_settings, embedded_worker=False) as replica:
        assert replica.get("/api/jobs", headers={"Cookie": f"compress_session={session}"}).status_code == 200
    out = client.post("/logout", headers={"Cookie": f"compress_session={session}"}, follow_redirects=False)
    assert out.status_code == 303 and list((client.data_dir / "sessions").iterdir()) == []
    replayed = client.get("/api/jobs", headers={"Cookie": f"compress_session={session}"})
    assert replayed.status_code == 401, "a cookie kept after logout still works"


def test_sessions_expire_and_end_when_the_token_changes(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", token=SecretStr(TOKEN), session_hours=1 / 3600)
    with running_service(settings, embedded_worker=False) as client:
        expiring = _cookie(client.post("/login", data={"token": TOKEN}, follow_redirects=False))
        time.sleep(1.5)
        assert client.get("/api/jobs", headers={"Cookie": f"compress_session={expiring}"}).status_code == 401
    settings = make_settings(tmp_path / "data", token=SecretStr(TOKEN))
    with running_service(settings, embedded_worker=False) as client:
        session = _cookie(client.post("/login", data={"token": TOKEN}, follow_redirects=False))
    rotated = make_settings(tmp_path / "data", token=SecretStr(TOKEN + "-new"))
    with running_service(rotated, embedded_worker=False) as client:
        assert client.get("/api/jobs", headers={"Cookie": f"compress_session={session}"}).status_code == 401


def test_secure_cookie_only_over_https_through_a_trusted_proxy(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", token=SecretStr(TOKEN))
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
    with running_service(settings, embedded_worker=False, client=("127.0.0.1", 40000)) as proxied:
        response = proxied.post("/login", data={"token": TOKEN}, headers=https, follow_redirects=False)
        assert "secure" in response.headers["set-cookie"].lower()
        # A browser behind the proxy sends its https Origin: same origin once the proxy is believed.
        origin = https | {"Origin": "https://testserver"}
        assert proxied.post("/logout", headers=origin, follow_redirects=False).status_code == 303
    with running_service(settings, embedded_worker=False, client=("198.51.100.9", 40000)) as direct:
        response = direct.post("/login", data={"token": TOKEN}, headers=https, follow_redirects=False)
        assert "secure" not in response.headers["set-cookie"].lower()


def test_wrong_tokens_lock_out_only_the_guessing_address(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", token=SecretStr(TOKEN))
    with running_service(settings, embedded_worker=False, client=("198.51.100.1", 40000)) as attacker:
        for _ in range(10):
            wrong = attacker.post("/login", data={"token": "guess"}, follow_redirects=False)
            assert wrong.status_code == 401
        for response in (
            attacker.post("/login", data={"token": TOKEN}, follow_redirects=False),
            attacker.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"}),
        ):
            assert response.status_code == 429, response.text[:200]
            assert int(response.headers["retry-after"]) >= 1
        assert "set-cookie" not in response.headers
        other = ServiceClient(attacker.app, settings.data_dir, client=("192.0.2.20", 40000))
        assert other.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 303
        assert other.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        for _ in range(10):  # Bearer guesses count the same as login guesses
            assert other.get("/api/jobs", headers={"Authorization": "Bearer guess"}).status_code == 401
        assert other.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 429


def test_an_ipv6_guesser_cannot_escape_the_lock_by_changing_address_within_its_64(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", token=SecretStr(TOKEN))
    with running_service(settings, embedded_worker=False, client=("2001:db8:1:2::1", 40000)) as first:
        for _ in range(10):
            assert first.post("/login", data={"token": "guess"}, follow_redirects=False).status_code == 401
        same_64 = ServiceClient(first.app, settings.data_dir, client=("2001:db8:1:2:ffff::7", 40000))
        assert same_64.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 429
        next_64 = ServiceClient(first.app, settings.data_dir, client=("2001:db8:1:3::1", 40000))
        assert next_64.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 303


# --- class 9 (part): the assets are behind the token, but what the login page needs -----------------------


def test_static_and_docs_assets_need_the_token(protected: tuple[ServiceClient, Counting]) -> None:
    client, _ = protected
    for path in ("/static/app.js", "/docs-assets/swagger-ui.css", "/docs-assets/swagger-ui-bundle.js"):
        response = client.get(path)
        assert response.status_code == 401 and error_of(response)["code"] == "unauthorized", path
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    login = client.get("/login")
    assert login.status_code == 200 and "/static/app.js" not in login.text
    for asset in re.findall(r'(?:href|src)="(/[^"]+)"', login.text):
        assert client.get(asset).status_code == 200, f"the login page needs {asset}"


def test_a_job_still_runs_end_to_end_with_a_session(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", token=SecretStr(TOKEN))
    with running_service(settings) as client:
        assert client.post("/login", data={"token": TOKEN}).status_code == 200
        response = submit(client, mlp_bytes(), plan_json({"kind": "quantize"}), headers={"Origin": "http://testserver"})
        assert response.status_code == 202, response.text
        job, _ = wait_for_job(client, response.json()["id"])
        assert job["state"] == "succeeded", job["error"]
