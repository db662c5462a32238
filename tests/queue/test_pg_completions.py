"""Completions side by side on PostgreSQL (issue 9): a plain completion shares the write lock
with claims, heartbeat flushes and other completions (``SQLQueue._completing``). What that
must not cost: a fair-share charge lost to a concurrent one, a dependency step that misses a
completion committed after a later event, a deadlock between two completions left as an
error. Each is injected here against the real server."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from fleetkit import make_cap, manifest_of
from pgkit import require_postgres
from trainfleet.queue import fairshare
from trainfleet.queue.base import JobRecord
from trainfleet.queue.beats import Beat, renew
from trainfleet.queue.sqlite import PostgresQueue
from trainfleet.queue.sqlite_attempts import complete_plain
from trainfleet.testing.postgres import fresh_schema
from trainfleet.testing.wait import wait_until

T0 = 1_000_000.0  # claims happen here
T1 = T0 + 1800.0  # and completions here (the clock is the test's)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pg() -> Iterator[tuple[str, PostgresQueue, Clock]]:
    require_postgres()
    clock = Clock()
    with fresh_schema() as url:
        queue = PostgresQueue(url, clock=clock, pool_size=10)
        try:
            yield url, queue, clock
        finally:
            queue.close()


def _jobs(n: int, extra: str = "") -> str:
    return "".join(f'[[jobs]]\nname = "j{i}"\n' for i in range(n)) + extra


def _claim_one_each(queue: PostgresQueue, workers: int) -> list[tuple[str, JobRecord]]:
    """``workers`` new workers (one host each), each holding one claimed job."""
    held = []
    for i in range(workers):
        worker, _ = queue.register_worker(make_cap(f"h{i}"))
        claim = queue.claim(worker.id)
        assert claim is not None
        held.append((worker.id, claim.job))
    return held


def _blocked_by(url: str, pid: int) -> bool:
    """Whether a session waits for a lock the session ``pid`` holds (only this test's: other
    tests wait on locks of the same server at the same time)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (pid,)
        ).fetchone()
        return bool(row and row[0])


def _usage(url: str) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT usage_h FROM fair_usage WHERE submitter = 'operator'").fetchone()
        return float(row[0]) if row else 0.0


def _finish(
    queue: PostgresQueue, gate: threading.Barrier, worker_id: str, job: JobRecord, done: list
) -> None:
    gate.wait(10)
    _, record = queue.complete_plain(job.id, worker_id, job.epoch, {"metrics": {}})
    assert record is not None
    done.append(record)


def test_completions_at_once_each_charge_fair_share(pg: tuple[str, PostgresQueue, Clock]) -> None:
    """Eight completions released together, four times over: every attempt's half hour is
    charged to the submitter (a charge read then written would lose some of them)."""
    url, queue, clock = pg
    workers, rounds = 8, 4
    queue.apply_manifest(manifest_of(_jobs(workers * rounds)))
    done: list[JobRecord] = []
    for _ in range(rounds):
        clock.now = T0
        held = _claim_one_each(queue, workers)
        clock.now = T1
        gate = threading.Barrier(workers)
        threads = [threading.Thread(target=_finish, args=(queue, gate, *h, done)) for h in held]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(done) == workers * rounds
    assert queue.counts() == {"completed": workers * rounds}
    one = fairshare.interval_hours(
        T0, T1, 24.0 * 7
    )  # the default half-life: no decay at one instant
    assert _usage(url) == pytest.approx(one * workers * rounds, rel=1e-9)
    with psycopg.connect(url, autocommit=True) as conn:
        busy = conn.execute("SELECT COUNT(*) FROM workers WHERE current_job IS NOT NULL")
        assert busy.fetchone()[0] == 0


def test_a_deadlock_between_completions_runs_again_alone(
    pg: tuple[str, PostgresQueue, Clock],
) -> None:
    """A batch locks its jobs' rows in id order; another shared writer that does not keep
    that order, holding the higher row and then asking for the lower, deadlocks it.
    PostgreSQL aborts one of the two; when it is the batch, it runs again under the exclusive
    lock (after the other writer's end: it holds the shared lock) and completes both jobs,
    once each."""
    url, queue, clock = pg
    queue.apply_manifest(manifest_of(_jobs(2)))
    worker, _ = queue.register_worker(make_cap("h0"))
    queue.set_worker_slots(worker.id, 2)
    claims = queue.claim_many(worker.id, 2)
    assert len(claims) == 2
    first, second = sorted((c.job for c in claims), key=lambda j: j.id)
    clock.now = T1
    out: list[object] = []
    with psycopg.connect(url, autocommit=True) as other:
        with other.transaction():
            # The batch waits first, so its own deadlock check (1 s by default) fires first:
            # PostgreSQL aborts the batch, not this transaction.
            other.execute("SET LOCAL deadlock_timeout = '30s'")
            other.execute("SELECT pg_advisory_xact_lock_shared(%s)", (queue.db.write_key,))
            other.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (second.id,))
            batch = threading.Thread(
                target=lambda: out.extend(
                    queue.complete_plain_many(
                        worker.id,
                        [(first.id, first.epoch, {}), (second.id, second.epoch, {})],
                        {},
                    )
                )
            )
            batch.start()
            pid = other.info.backend_pid
            wait_until(lambda: _blocked_by(url, pid), timeout_s=10, what="the batch")
            # The cycle: the batch holds the lower row and waits for the higher.
            other.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
        batch.join(30)
    assert not batch.is_alive()
    assert [type(o) for o in out] == [tuple, tuple], out
    assert [o[1].state for o in out] == ["completed", "completed"]  # type: ignore[index]
    assert queue.counts() == {"completed": 2}
    assert len([e for e in queue.events(first.id) if e.kind == "completed"]) == 1
    assert queue.run_again_alone == 1  # the batch was aborted, and ran again


def test_the_dependency_step_waits_for_a_completion_still_committing(
    pg: tuple[str, PostgresQueue, Clock],
) -> None:
    """A parent's completion holds its event's seq while a later completion (a higher seq)
    commits first. The dependency step must still see the parent complete: it reads the
    events under the exclusive lock, after every completion in flight (the clock never moves,
    so no periodic full look would cover a miss)."""
    url, queue, clock = pg
    # "other" is someone else's: completions of one submitter queue on its fair-share row.
    extra = '[[jobs]]\nname = "child"\nafter = ["j0"]\n[[jobs]]\nname = "other"\n'
    queue.apply_manifest(manifest_of(_jobs(1, extra + 'submitter = "someone"\n')))
    assert queue.resolve_dependencies() == 0  # the watch has looked once
    (w0, parent), (w1, other) = _claim_one_each(queue, 2)
    assert {parent.name, other.name} == {"j0", "other"}
    if parent.name != "j0":
        (w0, parent), (w1, other) = (w1, other), (w0, parent)
    committing, release = threading.Event(), threading.Event()
    pids: list[int] = []

    def slow_parent() -> None:  # the parent's completion, paused before its commit
        with queue.db.tx(shared=True) as conn:
            complete_plain(conn, parent.id, w0, parent.epoch, {}, clock)
            pids.append(conn.raw.info.backend_pid)  # type: ignore[attr-defined]
            committing.set()
            release.wait(30)

    holder = threading.Thread(target=slow_parent)
    holder.start()
    moved: list[int] = []
    try:
        assert committing.wait(10)
        queue.complete_plain(other.id, w1, other.epoch, {})  # a later seq, committed first
        step = threading.Thread(target=lambda: moved.append(queue.resolve_dependencies()))
        step.start()
        wait_until(lambda: moved or _blocked_by(url, pids[0]), timeout_s=10, what="the step")
    finally:
        release.set()
    holder.join(30)
    step.join(30)
    moved.append(queue.resolve_dependencies())
    assert sum(moved) == 1
    assert queue.get_job("child").state == "pending"


def test_a_batch_and_a_heartbeat_flush_lock_rows_in_one_order(
    pg: tuple[str, PostgresQueue, Clock],
) -> None:
    """A batch of completions naming its jobs in descending id order, beside a heartbeat flush
    that holds the lower id and then asks for the higher one: the batch locks its rows in id
    order first (the flush's order), so it waits for the flush instead of holding the higher
    row against it. Were they in a cycle, this flush (its deadlock check made the quicker)
    would be the one PostgreSQL aborts, and the test would fail with it."""
    url, queue, clock = pg
    queue.apply_manifest(manifest_of(_jobs(2)))
    worker, _ = queue.register_worker(make_cap("h0"))
    queue.set_worker_slots(worker.id, 2)
    low, high = sorted((c.job for c in queue.claim_many(worker.id, 2)), key=lambda j: j.id)
    clock.now = T1
    out: list[object] = []
    batch = threading.Thread(
        target=lambda: out.extend(
            queue.complete_plain_many(
                worker.id, [(high.id, high.epoch, {}), (low.id, low.epoch, {})], {}
            )
        )
    )
    with queue.db.tx(shared=True) as conn:  # the flush: its rows in id order
        conn.execute("SET LOCAL deadlock_timeout = '10ms'")
        renew(conn, [Beat(low.id, worker.id, low.epoch, T1)])
        batch.start()
        pid = conn.raw.info.backend_pid  # type: ignore[attr-defined]
        wait_until(lambda: _blocked_by(url, pid), timeout_s=10, what="the batch")
        renew(conn, [Beat(high.id, worker.id, high.epoch, T1)])
    batch.join(30)
    assert [o[1].state for o in out] == ["completed", "completed"]  # type: ignore[index]


@pytest.mark.parametrize("half_lives", [10.0, 2000.0])
def test_a_charge_long_after_the_last_matches_python(
    pg: tuple[str, PostgresQueue, Clock], half_lives: float
) -> None:
    """The charge decays the stored usage in SQL on PostgreSQL (``fairshare._ADD_DECAYED``):
    the same figure as ``decay`` in Python, also past a thousand half-lives, where a float
    underflows to 0 (an error in PostgreSQL, 0 in Python)."""
    url, queue, _ = pg
    queue.apply_manifest(manifest_of('[fair_share]\nhalf_life_h = 0.01\n[[jobs]]\nname = "a"\n'))
    h, later = 0.01, T0 + half_lives * 0.01 * 3600
    with queue.db.tx() as conn:
        fairshare.charge_spans(conn, "s", [(T0 - 30, T0)])
    with queue.db.tx(shared=True) as conn:
        fairshare.charge_spans(conn, "s", [(later - 30, later)])
    first, second = (
        fairshare.interval_hours(T0 - 30, T0, h),
        fairshare.interval_hours(later - 30, later, h),
    )
    expected = fairshare.decay(first, later - T0, h) + second
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT usage_h, at FROM fair_usage WHERE submitter = 's'").fetchone()
    assert row is not None and row[1] == later
    assert row[0] == pytest.approx(expected, rel=1e-12)
