"""Shared fixtures: a controllable clock, capabilities, and queues for every backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetkit import FakeClock, make_cap
from trainfleet.capability.model import Capability
from trainfleet.queue import JobQueue, QueueSettings
from trainfleet.queue.sqlite import SQLiteQueue


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cap() -> Callable[..., Capability]:
    return make_cap


QueueFactory = Callable[..., JobQueue]

BACKENDS = ["sqlite"]


@pytest.fixture(params=BACKENDS)
def make_queue(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> Iterator[QueueFactory]:
    """Builds queues of the parametrized backend, all sharing the test's fake clock."""
    made: list[JobQueue] = []

    def factory(**settings: float) -> JobQueue:
        s = QueueSettings(**{"heartbeat_timeout_s": 10.0, "idle_window_s": 5.0, **settings})
        if request.param == "sqlite":
            q: JobQueue = SQLiteQueue(tmp_path / f"queue{len(made)}.db", settings=s, clock=clock)
        else:  # pragma: no cover - new backends register here
            raise AssertionError(request.param)
        made.append(q)
        return q

    yield factory
    for q in made:
        q.close()


@pytest.fixture
def queue(make_queue: QueueFactory) -> JobQueue:
    return make_queue()
