"""Liveness at fleet scale against live processes (``coordinator.beats``): a real ``trainfleet
serve`` with its default heartbeat settings (beat every 2 s, lease 8 s, reaper every 1 s,
beats flushed every 1 s) and real ``trainfleet join`` workers.

- A worker killed with SIGKILL has its job pending again within 10 s of its last beat,
  read from the job's own record: the last beat the coordinator wrote and the ``lost`` event.
- A coordinator killed (SIGKILL: no shutdown code runs, so the beats it held in memory since
  its last flush are gone) and started again loses no job: the attempt goes on and completes,
  nothing is requeued (its start renews every lease: the durability rule).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from livefleet import kill_tree, slow_job, wait_until
from trainfleet.testing import ServedFleet

pytestmark = pytest.mark.slow

# The coordinator's defaults (cli serve / ServeConfig), passed explicitly by the harness.
DEFAULT_INTERVAL_S = 2.0
DEFAULT_LEASE_S = 8.0
REQUEUE_BOUND_S = 10.0  # the bound: a dead worker's job is back this soon


def events(fleet: ServedFleet, name: str) -> list[dict]:
    return list(fleet.job(name)["events"])


def test_a_killed_workers_job_is_pending_within_10s_of_its_last_beat(tmp_path: Path) -> None:
    with ServedFleet(
        tmp_path, heartbeat_interval_s=DEFAULT_INTERVAL_S, heartbeat_timeout_s=DEFAULT_LEASE_S
    ) as fleet:
        fleet.reload(slow_job("long", 300))
        worker = fleet.start_worker("cpu-a", proxy=False)
        fleet.wait_state("long", {"running"}, timeout_s=60)
        # A few beats answered from memory and flushed: the lease runs from the latest.
        first = fleet.job("long")["job"]["heartbeat_at"]
        wait_until(
            lambda: fleet.job("long")["job"]["heartbeat_at"] >= first + 2 * DEFAULT_INTERVAL_S,
            30,
            "beats flushed by the coordinator",
        )
        kill_tree(worker, signal.SIGKILL)
        job = wait_until(
            lambda: (j := fleet.job("long"))["job"]["state"] == "pending" and j, 60, "requeue"
        )
        last_beat = job["job"]["heartbeat_at"]
        [lost] = [e for e in job["events"] if e["kind"] == "lost"]
        silent_s = lost["at"] - last_beat
        assert DEFAULT_LEASE_S <= silent_s <= REQUEUE_BOUND_S, silent_s
        assert lost["to_state"] == "pending" and lost["epoch"] == 1


def test_a_coordinator_killed_between_flushes_loses_no_job(tmp_path: Path) -> None:
    # A lease long enough for the restart (a Python process start on a loaded machine); what
    # is tested is that beats lost with the process cost nothing.
    with ServedFleet(tmp_path, heartbeat_interval_s=DEFAULT_INTERVAL_S, heartbeat_timeout_s=30) as (
        fleet
    ):
        fleet.reload(slow_job("steady", 12))
        fleet.start_worker("cpu-a", proxy=False)
        fleet.wait_state("steady", {"running"}, timeout_s=60)
        first = fleet.job("steady")["job"]["heartbeat_at"]
        wait_until(
            lambda: fleet.job("steady")["job"]["heartbeat_at"] > first,
            30,
            "a beat answered from memory and flushed",
        )
        fleet.kill_coordinator()  # whatever beats the book held since its last flush are lost
        fleet.start_coordinator()
        job = fleet.wait_state("steady", {"completed"}, timeout_s=120)
        assert job["attempt"] == 1 and job["num_failures"] == 0
        kinds = [e["kind"] for e in events(fleet, "steady")]
        assert "lost" not in kinds and kinds.count("claimed") == 1, kinds
