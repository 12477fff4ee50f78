"""Service settings, read from COMPRESS_* environment variables (pydantic-settings)."""

from __future__ import annotations

import ipaddress
import math
import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings", "host_memory_mb", "is_loopback"]

MB = 1 << 20


class Settings(BaseSettings):
    """Every knob of the service; each field is also the env var COMPRESS_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="COMPRESS_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path("data"), description="Jobs, queue and artifacts live here.")
    host: str = Field("127.0.0.1", description="Bind address. Anything but loopback needs a token.")
    port: int = Field(8000, ge=1, le=65535)
    token: SecretStr | None = Field(None, description="Bearer token required on every route but /healthz.")
    token_file: Path | None = Field(None, description="Read the token from this file (e.g. a Docker secret).")
    session_hours: float = Field(12.0, gt=0, le=24 * 365, description="A web login lasts this long.")
    forwarded_allow_ips: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="Proxies (addresses or networks) whose X-Forwarded-Proto and X-Forwarded-For are believed.",
    )
    allow_insecure_bind: bool = Field(False, description="Allow a non-loopback bind without a token.")
    container: bool = Field(
        False,
        description="In a container whose published port decides who connects: a non-loopback bind needs no "
        "token, but then only loopback Host names may be allowed.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost", "::1"],
        description='Host header allow-list ("*" allows any).',
    )
    redis_url: str | None = Field(None, description="Queue on Redis (redis://host:6379/0) instead of SQLite.")
    embedded_worker: bool = Field(True, description="`serve` also consumes the queue in-process.")
    workers: int = Field(1, ge=1, le=64, description="Jobs run at the same time by one worker process.")
    threads_per_job: int = Field(0, ge=0, le=256, description="ONNX Runtime threads per job (0: cores / workers).")
    max_model_mb: int = Field(
        16384,
        ge=1,
        description="Largest model upload: a single .onnx file (at most 2 GiB, protobuf's limit, whatever this "
        "says) or a bundle (.zip or .tar of the .onnx and its external data files), and a bundle's unpacked total.",
    )
    max_data_mb: int = Field(256, ge=1, description="Largest calibration or evaluation upload (and its arrays).")
    max_uploads_in_flight: int = Field(8, ge=1, description="Concurrent uploads; more get 503 with Retry-After.")
    max_queued_jobs: int = Field(100, ge=1, description="Jobs waiting in the queue; more get 503.")
    max_uploads_per_client: int = Field(2, ge=1, description="Uploads in flight from one address; more get 429.")
    upload_timeout_s: float = Field(300.0, gt=0, description="A slow upload is cut off after this long.")
    upload_idle_s: float = Field(30.0, gt=0, description="An upload that sends nothing for this long is cut off.")
    upload_min_kib_s: float = Field(
        16.0, ge=0, description="After upload_grace_s an upload must average this many KiB/s (0: no minimum)."
    )
    upload_grace_s: float = Field(10.0, ge=0, description="Time an upload gets before its average rate counts.")
    header_timeout_s: float = Field(20.0, gt=0, description="A request's head must arrive whole within this.")
    min_free_disk_mb: int = Field(1024, ge=0, description="Uploads are refused (507) below this much free disk.")
    job_timeout_s: int = Field(1800, ge=1, description="Wall-clock deadline of one job.")
    job_memory_mb: int = Field(
        0,
        ge=0,
        description="Address-space limit of one job's process; 0: from the model's size (see job_memory_factor).",
    )
    job_memory_floor_mb: int = Field(8192, ge=256, description="With job_memory_mb 0: the least a job gets.")
    job_memory_factor: float = Field(
        8.0,
        gt=0,
        description="With job_memory_mb 0: a job gets this many times its upload's size, capped by the memory "
        "available on the host when it starts.",
    )
    job_file_mb: int = Field(
        0, ge=0, description="Largest file a job's process may write; 0: 4096 MB or twice the upload, the larger."
    )
    result_external_data_mb: int = Field(
        2048,
        ge=1,
        le=2048,
        description="A compressed model larger than this is returned as a zip of the .onnx and its external data "
        "file (2048: only past protobuf's 2 GiB limit; a plan can also ask with external_data).",
    )
    heartbeat_s: float = Field(5.0, gt=0, description="How often a running job's record is refreshed.")
    retention_hours: float = Field(168.0, gt=0, description="Finished jobs older than this are deleted.")

    @field_validator("token")
    @classmethod
    def _no_empty_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is None:
            return None
        text = token.get_secret_value().strip()
        if not text:
            # compare_digest(b"", b"") is True: an empty token would let everyone in, with a public bind allowed.
            raise ValueError("COMPRESS_TOKEN is empty or only whitespace: set a real token, or unset the variable")
        return SecretStr(text)

    @model_validator(mode="after")
    def _read_token_file(self) -> Settings:
        if self.token is None and self.token_file is not None:
            try:
                text = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ValueError(f"COMPRESS_TOKEN_FILE cannot be read: {e.strerror}") from e
            if not text:
                raise ValueError("COMPRESS_TOKEN_FILE is empty")
            self.token = SecretStr(text)
        return self

    @property
    def jobs_dir(self) -> Path:
        """Where job folders live."""
        return self.data_dir / "jobs"

    @property
    def job_threads(self) -> int:
        """ONNX Runtime threads each job uses."""
        return self.threads_per_job or max(1, (os.cpu_count() or 1) // self.workers)

    def job_limits(self, model_bytes: int) -> tuple[int, int]:
        """(memory MB, file MB) of the process of a job whose upload has `model_bytes` bytes.

        Memory: job_memory_mb when set; else job_memory_factor times the upload, at least job_memory_floor_mb and
        at most the memory the host has available when the job starts (see host_memory_mb).
        Files: job_file_mb when set; else twice the upload (a bundle's data file and the job's temp copies of
        a model past 2 GiB are as large as the model), at least 4096 MB.
        """
        model_mb = -(-model_bytes // MB)
        memory = self.job_memory_mb
        if memory == 0:
            memory = max(self.job_memory_floor_mb, math.ceil(self.job_memory_factor * model_mb))
            memory = min(memory, max(self.job_memory_floor_mb, host_memory_mb()))
        files = self.job_file_mb or max(4096, 2 * model_mb)
        return memory, files

    def check_bind(self) -> None:
        """Refuse to serve on a non-loopback address without a token, unless explicitly allowed."""
        if not is_loopback(self.host) and self.token is None and not self.allow_insecure_bind:
            if self.container:
                _check_container_hosts(self.allowed_hosts)
                return
            raise SystemExit(
                f"refusing to listen on {self.host} without a token: set COMPRESS_TOKEN "
                "(or COMPRESS_ALLOW_INSECURE_BIND=1 if something in front of this service authenticates)"
            )


def _check_container_hosts(allowed_hosts: list[str]) -> None:
    """In a container without a token, only loopback Host names: a page that rebinds its name is refused."""
    others = [h for h in allowed_hosts if not is_loopback(h.strip("[]"))]
    if others:
        raise SystemExit(
            f"refusing to serve the Host names {others!r} without a token: without COMPRESS_TOKEN the container "
            "answers only loopback names (publish it with -p 127.0.0.1:PORT:8000); set COMPRESS_TOKEN to serve "
            "other names"
        )


def host_memory_mb() -> int:
    """The memory the host has available now, in MB: MemAvailable of /proc/meminfo, else the physical total.

    Available rather than total: a job limit above what the other processes leave would end in the kernel's
    OOM killer (SIGKILL, maybe of another process) instead of the job's own clear out_of_memory.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MB
    except (ValueError, OSError, AttributeError):
        return 0


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    """The process's settings (tests override this dependency)."""
    return Settings()
