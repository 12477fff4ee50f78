"""Settings and the protections they configure: bind check, bearer token, Host allow-list."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from service.settings import Settings, is_loopback

from service_harness import ServiceClient, error_of, make_settings, mlp_bytes, plan_json, running_service, submit

TOKEN = "s3cret-token-for-tests"
GUARDED = ["/api/jobs", "/api/jobs/0123456789abcdef0123456789abcdef", "/openapi.json", "/docs"]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_bind_needs_no_token(host: str) -> None:
    assert is_loopback(host)
    Settings(host=host).check_bind()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_non_loopback_bind_without_token_refuses_to_start(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(SystemExit, match="without a token"):
        Settings(host=host).check_bind()
    Settings(host=host, token=SecretStr(TOKEN)).check_bind()
    Settings(host=host, allow_insecure_bind=True).check_bind()


def test_settings_come_from_compress_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COMPRESS_TOKEN", TOKEN)
    monkeypatch.setenv("COMPRESS_MAX_MODEL_MB", "7")
    monkeypatch.setenv("COMPRESS_ALLOWED_HOSTS", '["a.example", "b.example"]')
    settings = Settings()
    assert settings.data_dir == tmp_path and settings.jobs_dir == tmp_path / "jobs"
    assert settings.token is not None and settings.token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings)
    assert settings.max_model_mb == 7 and settings.allowed_hosts == ["a.example", "b.example"]


def test_threads_per_job_default_splits_the_cores_between_workers() -> None:
    assert Settings(threads_per_job=3).job_threads == 3
    assert Settings(workers=64).job_threads >= 1


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[ServiceClient]:
    """An app with a token (no worker: no job runs here)."""
    with running_service(make_settings(tmp_path / "data", token=SecretStr(TOKEN)), embedded_worker=False) as client:
        yield client


def test_healthz_answers_without_the_token(guarded: ServiceClient) -> None:
    assert guarded.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", GUARDED)
def test_routes_without_a_token_or_with_a_wrong_one_get_401(guarded: ServiceClient, path: str) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ):
        response = guarded.get(path, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert error_of(response)["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


def test_upload_without_the_token_is_refused_before_anything_is_stored(guarded: ServiceClient) -> None:
    response = submit(guarded, mlp_bytes(), plan_json({"kind": "quantize"}))
    assert response.status_code == 401 and error_of(response)["code"] == "unauthorized"
    assert list((guarded.data_dir / "jobs").iterdir()) == []


def test_the_bearer_token_opens_every_route(guarded: ServiceClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert guarded.get("/api/jobs", headers=auth).json() == []
    assert guarded.get("/openapi.json", headers=auth).status_code == 200
    assert guarded.get("/docs", headers=auth).status_code == 200
    missing = guarded.get("/api/jobs/0123456789abcdef0123456789abcdef", headers=auth)
    assert missing.status_code == 404 and error_of(missing)["code"] == "job_not_found"
    response = submit(guarded, mlp_bytes(), plan_json({"kind": "quantize"}), headers=auth)
    assert response.status_code == 202
    assert guarded.get(f"/api/jobs/{response.json()['id']}", headers=auth).json()["state"] == "queued"


def test_host_header_not_on_the_allow_list_gets_400(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    with running_service(settings, embedded_worker=False, base_url="http://evil.example") as client:
        assert client.get("/healthz").status_code == 400
        assert client.get("/api/jobs").status_code == 400
    with running_service(settings, embedded_worker=False, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/healthz").status_code == 200


def test_default_allowed_hosts_accept_loopback_names_including_ipv6(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", min_free_disk_mb=0)
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        with running_service(settings, embedded_worker=False, base_url=base) as client:
            assert client.get("/healthz").status_code == 200, base
    with running_service(settings, embedded_worker=False, base_url="http://10.0.0.1:8000") as client:
        assert client.get("/healthz").status_code == 400


def test_token_can_come_from_a_file_such_as_a_docker_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "compress_token"
    secret.write_text("s3cret-from-file\n")
    monkeypatch.setenv("COMPRESS_TOKEN_FILE", str(secret))
    settings = Settings()
    assert settings.token is not None and settings.token.get_secret_value() == "s3cret-from-file"
    settings.host = "0.0.0.0"
    settings.check_bind()  # a token is set, so a public bind is allowed


def test_empty_or_missing_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        Settings(token_file=tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot be read"):
        Settings(token_file=tmp_path / "missing")


@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_empty_or_blank_token_is_refused_with_a_clear_message(value: str) -> None:
    with pytest.raises(ValueError, match="COMPRESS_TOKEN is empty or only whitespace"):
        Settings(token=SecretStr(value))


def test_token_is_stripped_like_a_token_file() -> None:
    settings = Settings(token=SecretStr(f"  {TOKEN}\n"))
    assert settings.token is not None and settings.token.get_secret_value() == TOKEN
