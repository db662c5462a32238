"""Shared fixtures: a controllable clock, capabilities, and queues for every backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetkit import FakeClock, make_cap
from pgkit import SchemaPool, require_postgres
from trainfleet.capability.model import Capability
from trainfleet.queue import JobQueue, QueueSettings
from trainfleet.queue.sqlite import PostgresQueue, SQLiteQueue


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cap() -> Callable[..., Capability]:
    return make_cap


QueueFactory = Callable[..., JobQueue]

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def pg_schemas() -> Iterator[SchemaPool]:
    """This test process's PostgreSQL schemas, reused empty from test to test."""
    pool = SchemaPool()
    yield pool
    pool.close()


@pytest.fixture(params=BACKENDS)
def make_queue(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> Iterator[QueueFactory]:
    """Builds queues of the parametrized backend, all sharing the test's fake clock. Each
    queue is an empty database of its own: a SQLite file, or a PostgreSQL schema."""
    schemas: SchemaPool | None = None
    if request.param == "postgres":
        require_postgres()
        schemas = request.getfixturevalue("pg_schemas")
    made: list[JobQueue] = []
    urls: list[str] = []

    def factory(**settings: float) -> JobQueue:
        s = QueueSettings(**{"heartbeat_timeout_s": 10.0, "idle_window_s": 5.0, **settings})
        q: JobQueue
        if request.param == "sqlite":
            q = SQLiteQueue(tmp_path / f"queue{len(made)}.db", settings=s, clock=clock)
        elif schemas is not None:
            urls.append(schemas.take())
            q = PostgresQueue(urls[-1], settings=s, clock=clock, pool_size=4)
        else:  # pragma: no cover - new backends register here
            raise AssertionError(request.param)
        made.append(q)
        return q

    yield factory
    for q in made:
        q.close()
    for url in urls:
        assert schemas is not None
        schemas.give_back(url)


@pytest.fixture
def queue(make_queue: QueueFactory) -> JobQueue:
    return make_queue()
