"""Shared fixtures: a controllable clock, capabilities, manifests, queues per backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from trainfleet.capability.model import Capability
from trainfleet.manifest import parse_manifest
from trainfleet.manifest.spec import Manifest
from trainfleet.queue import JobQueue, QueueSettings
from trainfleet.queue.sqlite import SQLiteQueue


class FakeClock:
    """A clock tests move by hand: no sleeping to wait for time to pass."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_cap(
    host: str = "cpu-a",
    *,
    cuda: bool = False,
    vram_gib: float = 0.0,
    cores: int = 4,
    ram_gib: float = 16.0,
) -> Capability:
    return Capability(
        host=host,
        hostname=host,
        cores=cores,
        ram_gib=ram_gib,
        cuda=cuda,
        num_gpus=1 if cuda else 0,
        gpu_names=["Fake GPU"] if cuda else [],
        vram_gib=vram_gib if cuda else 0.0,
    )


@pytest.fixture
def cap() -> Callable[..., Capability]:
    return make_cap


def manifest_of(text: str) -> Manifest:
    return parse_manifest(text, "test.toml")


QueueFactory = Callable[..., JobQueue]

BACKENDS = ["sqlite"]


@pytest.fixture(params=BACKENDS)
def make_queue(request: pytest.FixtureRequest, tmp_path, clock) -> Iterator[QueueFactory]:
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
