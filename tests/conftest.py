"""Settings of the whole test session."""

from __future__ import annotations

import gc

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what collection imported out of the cyclic collector's sight.

    compress() runs a full collection after each step (to give memory back at once); with the test session's
    hundreds of thousands of long-lived objects (every imported module and collected test) each of those took a
    tenth of a second or more. Frozen objects are never collected, so garbage is collected first.
    """
    gc.collect()
    gc.freeze()
