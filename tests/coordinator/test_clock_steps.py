"""Wall-clock steps between reaper passes neither requeue running jobs nor keep lost ones.

The reaper pass (``reap_once``) is driven by hand, with the queue's wall clock and the
reaper's monotonic clock both fake: no sleeping.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetkit import FakeClock, make_cap, manifest_of
from trainfleet.artifacts import ArtifactStore
from trainfleet.coordinator.app import reap_once
from trainfleet.coordinator.clock_steps import ClockSteps
from trainfleet.coordinator.state import Coordinator
from trainfleet.queue import QueueSettings
from trainfleet.queue.sqlite import SQLiteQueue

HEARTBEAT_TIMEOUT_S = 10.0


class Clocks:
    def __init__(self) -> None:
        self.wall = FakeClock(1_000_000.0)
        self.mono = FakeClock(50.0)

    def run(self, seconds: float) -> None:
        """Time passes: both clocks move together."""
        self.wall.advance(seconds)
        self.mono.advance(seconds)


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def coord(tmp_path: Path, clocks: Clocks) -> Iterator[Coordinator]:
    settings = QueueSettings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    queue = SQLiteQueue(tmp_path / "q.db", settings=settings, clock=clocks.wall)
    try:
        yield Coordinator(
            queue=queue,
            store=ArtifactStore(tmp_path / "artifacts"),
            staging_dir=tmp_path / "staging",
            operator_token="op",
            join_token="join",
        )
    finally:
        queue.close()


def claimed_job(coord: Coordinator) -> str:
    coord.queue.apply_manifest(manifest_of('[[jobs]]\nname = "solo"'))
    worker, _ = coord.queue.register_worker(make_cap("cpu-a"))
    claim = coord.queue.claim(worker.id)
    assert claim is not None
    return claim.job.id


def state(coord: Coordinator, job_id: str) -> str:
    return coord.queue.get_job(job_id).state


def test_a_forward_step_restarts_leases_instead_of_requeueing(
    coord: Coordinator, clocks: Clocks, caplog: pytest.LogCaptureFixture
) -> None:
    steps = ClockSteps(clocks.wall, clocks.mono)
    job_id = claimed_job(coord)
    assert reap_once(coord, steps) == []
    clocks.run(1)
    clocks.wall.advance(3600)  # an hour's step: every lease looks long expired
    assert reap_once(coord, steps) == []
    assert state(coord, job_id) == "claimed"
    assert "wall clock stepped +3600.0s" in caplog.text
    assert "1 active lease(s) restart now" in caplog.text
    # The lease restarted at the step; a worker that stays silent is still requeued.
    clocks.run(HEARTBEAT_TIMEOUT_S - 1)
    assert reap_once(coord, steps) == []
    clocks.run(2)
    assert [job.id for job in reap_once(coord, steps)] == [job_id]
    assert state(coord, job_id) == "pending"


def test_a_backward_step_does_not_extend_leases_by_its_size(
    coord: Coordinator, clocks: Clocks
) -> None:
    steps = ClockSteps(clocks.wall, clocks.mono)
    job_id = claimed_job(coord)
    assert reap_once(coord, steps) == []
    clocks.run(1)
    clocks.wall.advance(-86_400)  # a day back: the last beat is now a day in the future
    assert reap_once(coord, steps) == []
    # Lost within one heartbeat timeout of the step, not a day later.
    clocks.run(HEARTBEAT_TIMEOUT_S + 1)
    assert [job.id for job in reap_once(coord, steps)] == [job_id]


def test_a_step_within_tolerance_changes_no_lease(
    coord: Coordinator, clocks: Clocks, caplog: pytest.LogCaptureFixture
) -> None:
    steps = ClockSteps(clocks.wall, clocks.mono)
    job_id = claimed_job(coord)
    assert reap_once(coord, steps) == []
    clocks.run(9)
    clocks.wall.advance(0.5)
    assert reap_once(coord, steps) == []
    clocks.run(1)  # 10.5 s of silence on the wall clock: past the 10 s timeout
    assert [job.id for job in reap_once(coord, steps)] == [job_id]
    assert "stepped" not in caplog.text


def test_a_failed_renewal_leaves_the_step_for_the_next_pass(
    coord: Coordinator, clocks: Clocks, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = ClockSteps(clocks.wall, clocks.mono)
    job_id = claimed_job(coord)
    assert reap_once(coord, steps) == []
    clocks.wall.advance(600)
    real_renew = coord.queue.renew_leases

    def renew_fails() -> int:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(coord.queue, "renew_leases", renew_fails)
    with pytest.raises(RuntimeError):
        reap_once(coord, steps)
    assert state(coord, job_id) == "claimed"  # nothing reaped on a failed pass
    monkeypatch.setattr(coord.queue, "renew_leases", real_renew)
    clocks.run(1)
    assert reap_once(coord, steps) == []  # the step is still seen, and forgiven
    assert state(coord, job_id) == "claimed"


def test_slow_drift_never_adds_up_to_a_step(clocks: Clocks) -> None:
    steps = ClockSteps(clocks.wall, clocks.mono, tolerance_s=1.0)
    assert steps.step_s() == 0.0
    for _ in range(1000):  # 1000 passes, the wall clock 10 ms fast each: 10 s in all
        clocks.run(1)
        clocks.wall.advance(0.01)
        assert steps.step_s() == 0.0
        steps.settle()
    clocks.wall.advance(-2)
    assert steps.step_s() == pytest.approx(-2)
