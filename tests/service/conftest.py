"""Fixtures of the service tests; the helpers live in tests/service_harness.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings

from service_harness import make_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings of a fresh test app in this test's tmp dir."""
    return make_settings(tmp_path / "data")
