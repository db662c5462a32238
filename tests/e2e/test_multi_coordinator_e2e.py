"""Two ``trainfleet serve`` processes on one PostgreSQL database serve one fleet of real
workers (``trainfleet join URL1,URL2``): every job completes exactly once, never claimed
twice at once, with exactly one leader; SIGKILL the leader mid-load and the workers fail over,
the survivor takes the lead, reaps the job of a worker killed meanwhile, and nothing is lost.
The proof is read from the jobs' events, which the database wrote."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livefleet import kill_tree, slow_job, wait_until
from pgkit import require_postgres
from trainfleet.coordinator.leader import schema_key
from trainfleet.queue.db import LEADER_KEY
from trainfleet.testing.multi import MultiServedFleet
from trainfleet.testing.postgres import fresh_schema

pytestmark = pytest.mark.slow

NUM_JOBS = 12
LONG_JOB, LONG_S = "job-long", 4.0
HOSTS = ("cpu-a", "cpu-b", "cpu-c")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema; skipped without a server, except in CI."""
    require_postgres()
    with fresh_schema() as url:
        yield url


def leader_locks(url: str) -> int:
    """Sessions holding this schema's leader lock, as the server counts them."""
    import psycopg

    schema = url.rsplit("%3D", 1)[1]
    key = schema_key(LEADER_KEY, schema)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 1 AND classid::bigint = %s AND objid::bigint = %s",
            (key >> 32, key & 0xFFFF_FFFF),
        ).fetchone()
        assert row is not None
        return int(row[0])


def check_exactly_once(fleet: MultiServedFleet, names: list[str]) -> dict[str, list[Any]]:
    """Every job completed, by exactly one completion; each claim took a pending job with a
    new epoch (no double claim); the completion is the last claim's. The events by job."""
    events: dict[str, list[Any]] = {}
    for name in names:
        detail = fleet.job(name)
        assert detail["job"]["state"] == "completed", detail["job"]
        log = sorted(detail["events"], key=lambda e: e["seq"])
        events[name] = log
        claims = [e for e in log if e["to_state"] == "claimed"]
        assert claims and all(c["from_state"] == "pending" for c in claims), log
        epochs = [c["epoch"] for c in claims]
        assert epochs == sorted(set(epochs)), log
        completions = [e for e in log if e["kind"] == "completed"]
        assert len(completions) == 1, log
        assert completions[0]["epoch"] == epochs[-1], log
    return events


def test_two_coordinators_one_database_survive_killing_the_leader(
    tmp_path: Path, pg_url: str
) -> None:
    with MultiServedFleet(tmp_path, pg_url, num_coordinators=2) as fleet:
        try:
            run_scenario(fleet, pg_url)
        except BaseException:
            print(fleet.server_log_text()[-8000:])
            for worker in fleet.workers:
                print(f"--- {worker.host}\n{worker.log_path.read_text()[-2000:]}")
            raise


def run_scenario(fleet: MultiServedFleet, pg_url: str) -> None:
    leaders = wait_until(lambda: fleet.leaders(), 10, "a leader")
    assert len(leaders) == 1 and leader_locks(pg_url) == 1
    first = leaders[0]

    names = [f"job-{i:02d}" for i in range(NUM_JOBS)]
    # One longer job among them: the worker running it is killed (with it) mid-run.
    names.insert(NUM_JOBS // 2, LONG_JOB)
    fleet.reload("".join(slow_job(name, LONG_S if name == LONG_JOB else 1.0) for name in names))
    workers = {host: fleet.start_worker(host) for host in HOSTS}

    def completed() -> int:
        return sum(j["state"] == "completed" for j in fleet.operator.jobs())

    wait_until(lambda: completed() >= 3, 60, "the first completions")  # mid-load
    fleet.kill_coordinator(first)
    # A worker dies too, with its job: only a reaper (the survivor's, once it leads) can
    # give that job back to the fleet.
    long_job = fleet.wait_state(LONG_JOB, {"running"}, 30)
    host = next(w["host"] for w in fleet.operator.workers() if w["id"] == long_job["worker_id"])
    kill_tree(workers[host])

    survivor = 1 - first
    wait_until(lambda: fleet.leaders() == [survivor], 10, "the survivor to lead")
    assert leader_locks(pg_url) == 1

    wait_until(lambda: completed() == len(names), 90, "every job to complete")
    events = check_exactly_once(fleet, names)
    lost = [e for e in events[LONG_JOB] if e["kind"] == "lost"]
    assert [e["worker_id"] for e in lost] == [long_job["worker_id"]], events[LONG_JOB]
    assert all(w.poll() is None for h, w in workers.items() if h != host)  # they failed over

    # The killed coordinator comes back as a follower: still exactly one leader.
    fleet.start_coordinator(first)
    assert (fleet.health(first) or {}).get("leader") is False
    assert fleet.leaders() == [survivor] and leader_locks(pg_url) == 1
