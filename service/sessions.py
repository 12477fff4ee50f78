"""Login sessions kept under the data directory, and the per-client throttle of wrong tokens.

A session id is 256 random bits; only its SHA-256 is stored (`<data_dir>/sessions/<hash>`, mode 0600), with its
expiry and an HMAC of both keyed by the token. Whoever can read the folder cannot turn a file into a cookie,
whoever can write it cannot forge a session without the token, and changing the token ends every session.
API replicas that share the data directory share the sessions. Logging out deletes the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import time
from collections import OrderedDict
from pathlib import Path

from pydantic import SecretStr

__all__ = ["LoginThrottle", "SessionStore", "client_key"]

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
_HASH = re.compile(r"[0-9a-f]{64}")
_MAX_SESSIONS = 10_000  # past this, the sessions closest to expiry are dropped
_SWEEP_EVERY_S = 600.0


class SessionStore:
    """Create, check and revoke sessions stored as files named by the hash of their id."""

    def __init__(self, folder: Path, token: SecretStr | None, lifetime_s: float) -> None:
        self.folder, self.lifetime_s = folder, lifetime_s
        self._key = token.get_secret_value().encode() if token is not None else b""
        self._swept = 0.0

    def _mac(self, digest: str, expires: int) -> str:
        return hmac.new(self._key, f"{digest}:{expires}".encode(), hashlib.sha256).hexdigest()

    def _path(self, session_id: str) -> Path | None:
        if not _SESSION_ID.fullmatch(session_id):
            return None
        return self.folder / hashlib.sha256(session_id.encode()).hexdigest()

    def create(self) -> str:
        """A new session id, valid for the store's lifetime."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sweep()
        session_id = secrets.token_urlsafe(32)
        path = self._path(session_id)
        assert path is not None
        expires = int(time.time() + self.lifetime_s)
        record = json.dumps({"expires": expires, "mac": self._mac(path.name, expires)}).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(record)
        return session_id

    def valid(self, session_id: str) -> bool:
        """True when the session exists, was made with the current token and has not expired."""
        path = self._path(session_id)
        if path is None:
            return False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                record = json.loads(f.read(512))
            expires, mac = int(record["expires"]), str(record["mac"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not hmac.compare_digest(mac, self._mac(path.name, expires)):
            return False
        if expires <= time.time():
            path.unlink(missing_ok=True)
            return False
        return True

    def revoke(self, session_id: str) -> None:
        """End a session (logout); unknown ids are ignored."""
        path = self._path(session_id)
        if path is not None:
            path.unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Delete expired sessions (at most every few minutes), and the oldest past the count cap."""
        now = time.time()
        if now - self._swept < _SWEEP_EVERY_S and len(os.listdir(self.folder)) < _MAX_SESSIONS:
            return
        self._swept = now
        alive: list[tuple[int, Path]] = []
        for path in self.folder.iterdir():
            if not _HASH.fullmatch(path.name):
                continue
            try:
                with path.open("rb") as f:
                    expires = int(json.loads(f.read(512))["expires"])
            except (OSError, ValueError, KeyError, TypeError):
                expires = 0
            if expires <= now:
                path.unlink(missing_ok=True)
            else:
                alive.append((expires, path))
        alive.sort()
        for _, path in alive[: max(0, len(alive) - _MAX_SESSIONS + 1)]:
            path.unlink(missing_ok=True)


def client_key(host: str | None) -> str:
    """The throttle's key for a client address: the address itself, or its /64 for IPv6 (one subscriber)."""
    if not host:
        return "unknown"
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host)
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return str(address)
    return host[:100]


class LoginThrottle:
    """Wrong tokens per client address: FREE_FAILURES free, then a lock that doubles with each failure.

    Keyed by address, so a guesser locks out only its own address (and whoever shares it), never everyone.
    The table is bounded: past MAX_CLIENTS the least recently failing address is forgotten.
    """

    FREE_FAILURES = 10
    FIRST_LOCK_S = 30.0
    MAX_LOCK_S = 900.0
    FORGET_S = 3600.0  # failures are forgotten after this long without a new one
    MAX_CLIENTS = 10_000

    def __init__(self) -> None:
        self._clients: OrderedDict[str, tuple[int, float, float]] = OrderedDict()  # failures, last, locked until

    def retry_after(self, key: str) -> int:
        """Seconds this client must wait before its token is checked again (0: go ahead)."""
        entry = self._clients.get(key)
        if entry is None:
            return 0
        now = time.monotonic()
        if now - entry[1] > self.FORGET_S:
            del self._clients[key]
            return 0
        return max(0, int(entry[2] - now + 0.999))

    def failed(self, key: str) -> None:
        """Record a wrong token from this client."""
        now = time.monotonic()
        failures, last, _ = self._clients.pop(key, (0, now, 0.0))
        failures = 1 if now - last > self.FORGET_S else failures + 1
        locked_until = 0.0
        if failures >= self.FREE_FAILURES:
            locked_until = now + min(self.FIRST_LOCK_S * 2 ** min(failures - self.FREE_FAILURES, 10), self.MAX_LOCK_S)
        self._clients[key] = (failures, now, locked_until)
        while len(self._clients) > self.MAX_CLIENTS:
            self._clients.popitem(last=False)
