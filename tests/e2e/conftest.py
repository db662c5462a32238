"""End-to-end fixtures: a live fleet from the harness (``trainfleet.testing.LiveFleet``): a
uvicorn coordinator in a thread (port 0) and real ``trainfleet join`` worker processes, each
behind its own fault proxy; everything they started is killed at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from trainfleet.testing import LiveFleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    with LiveFleet(
        tmp_path, heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0, reap_interval_s=0.25
    ) as live:
        yield live
