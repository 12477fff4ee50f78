"""The configuration every plan model shares: immutable, and unknown fields refused."""

from __future__ import annotations

from pydantic import ConfigDict

__all__ = ["FROZEN"]

FROZEN = ConfigDict(frozen=True, extra="forbid")
