"""Group commit (``coordinator.group_commit``): queue calls waiting together share one
transaction; a call that fails is rolled back alone and gets its own error."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from fleetkit import FakeClock, make_cap, manifest_of
from trainfleet.coordinator import group_commit
from trainfleet.coordinator.group_commit import GroupWriter
from trainfleet.coordinator.writer import run_on
from trainfleet.queue.db import SQLiteDatabase
from trainfleet.queue.sqlite import SQLiteQueue


def table_db(tmp_path: Path) -> SQLiteDatabase:
    """A database with one table, ``t (v)``."""
    db = SQLiteDatabase(tmp_path / "g.db")
    with db.tx() as conn:
        conn.execute("CREATE TABLE t (v INTEGER)")
    return db


def insert(db: SQLiteDatabase, value: int) -> int:
    with db.tx() as conn:
        conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
    return value


def insert_then_fail(db: SQLiteDatabase, value: int) -> None:
    with db.tx() as conn:
        conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
        raise ValueError(f"refused {value}")


def test_waiting_calls_commit_together_and_a_failure_rolls_back_alone(tmp_path: Path) -> None:
    db = table_db(tmp_path)
    writer = GroupWriter(db)
    release = threading.Event()
    try:
        blocker = writer.submit(release.wait, 30)  # the writer is busy: the next calls wait
        futures = [
            writer.submit(insert, db, 1),
            writer.submit(insert_then_fail, db, 2),
            writer.submit(insert, db, 3),
        ]
        release.set()
        assert blocker.result(30) is True
        assert futures[0].result(30) == 1
        with pytest.raises(ValueError, match="refused 2"):
            futures[1].result(30)
        assert futures[2].result(30) == 3
        assert writer.groups == 1  # the three waited together: one transaction
        with db.read() as conn:
            values = [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v").fetchall()]
        assert values == [1, 3]
    finally:
        writer.shutdown()
        db.close()
    with pytest.raises(RuntimeError):
        writer.submit(insert, db, 4)


def test_event_loop_calls_are_answered_on_the_loop_and_a_cancelled_one_is_skipped(
    tmp_path: Path,
) -> None:
    """``run_on`` (``coordinator.writer``) awaits ``GroupWriter.call``: a group's answers reach
    the loop together; a call whose awaiting task was cancelled before its turn never runs."""
    db = table_db(tmp_path)
    writer = GroupWriter(db)
    started, release = threading.Event(), threading.Event()

    def block() -> bool:
        started.set()
        return release.wait(30)

    async def scenario() -> list[object]:
        blocker = asyncio.ensure_future(run_on(writer, block))
        assert await asyncio.to_thread(started.wait, 30)  # the writer is busy from now on
        calls = [
            asyncio.ensure_future(run_on(writer, insert, db, 1)),
            asyncio.ensure_future(run_on(writer, insert_then_fail, db, 2)),
            asyncio.ensure_future(run_on(writer, insert, db, 3)),
        ]
        await asyncio.sleep(0)  # every call is queued behind the blocker
        calls[2].cancel()
        release.set()
        return await asyncio.gather(blocker, *calls, return_exceptions=True)

    try:
        got = asyncio.run(scenario())
        assert got[:2] == [True, 1]
        assert isinstance(got[2], ValueError) and "refused 2" in str(got[2])
        assert isinstance(got[3], asyncio.CancelledError)
        with db.read() as conn:
            values = [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v").fetchall()]
        assert values == [1]  # 2 rolled back alone, 3 never ran
    finally:
        writer.shutdown()
        db.close()


def test_a_clean_group_takes_no_savepoints_and_a_failed_one_runs_again_with_them(
    tmp_path: Path,
) -> None:
    """A group none of whose calls fails commits with no savepoint; one whose call fails is
    rolled back whole and run again with a savepoint per call, so every other call's writes
    land exactly once."""
    db = table_db(tmp_path)
    statements: list[str] = []
    db.raw.set_trace_callback(statements.append)
    writer = GroupWriter(db)
    try:
        for calls in ([1, 2, 3], [4, "fail", 6]):
            started, release = threading.Event(), threading.Event()

            def block(
                started: threading.Event = started, release: threading.Event = release
            ) -> bool:
                started.set()
                return release.wait(30)

            blocker = writer.submit(block)
            assert started.wait(30)  # the writer is busy: the calls below wait as one group
            statements.clear()
            futures = [
                writer.submit(insert_then_fail, db, 5)
                if v == "fail"
                else writer.submit(insert, db, v)
                for v in calls
            ]
            release.set()
            assert blocker.result(30) is True
            for v, future in zip(calls, futures, strict=True):
                if v == "fail":
                    with pytest.raises(ValueError, match="refused 5"):
                        future.result(30)
                else:
                    assert future.result(30) == v
            savepoints = [s for s in statements if s.startswith("SAVEPOINT")]
            assert len(savepoints) == (0 if calls == [1, 2, 3] else 3)
        assert writer.groups == 2 and writer.retried == 1
        with db.read() as conn:
            values = [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v").fetchall()]
        assert values == [1, 2, 3, 4, 6]
    finally:
        writer.shutdown()
        db.close()


# A group's claims and completions leave their events and fair-share charges to be written
# together (``SQLiteDatabase.group``): the rows must be those of the same calls one by one.
SIX = "\n".join(f'[[jobs]]\nname = "j{i}"' for i in range(6))


def _in_one_group(writer: GroupWriter, calls: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``calls`` (fn, *args) as one group: the writer is held busy while they queue.
    Each outcome is its value or the exception it raised."""
    started, release = threading.Event(), threading.Event()

    def block() -> bool:
        started.set()
        return release.wait(30)

    blocker = writer.submit(block)
    assert started.wait(30)
    futures = [writer.submit(fn, *args) for fn, *args in calls]
    release.set()
    assert blocker.result(30) is True
    return [f.exception(30) or f.result(30) for f in futures]


def _one_by_one(_: Any, calls: list[tuple[Any, ...]]) -> list[Any]:
    out = []
    for fn, *args in calls:
        try:
            out.append(fn(*args))
        except Exception as err:  # compared with the group's outcome
            out.append(err)
    return out


def _scenario(tmp_path: Path, run: Any) -> tuple[list[Any], dict[str, Any], list[str]]:
    """The same calls, in the same steps and times, through ``run``; returns every call's
    outcome (as plain data), what the database holds afterwards, and the statements."""
    clock = FakeClock()
    queue = SQLiteQueue(tmp_path / "q.db", clock=clock)
    queue.reap_on_claim = False  # as in the coordinator (its reaper runs on its own)
    queue.apply_manifest(manifest_of(SIX))
    workers = [queue.register_worker(make_cap(f"cpu-{i}"))[0].id for i in range(4)]
    role = {w: f"w{i}" for i, w in enumerate(workers)}
    statements: list[str] = []
    queue.db.raw.set_trace_callback(statements.append)  # type: ignore[attr-defined]
    writer = GroupWriter(queue.db)
    outcomes: list[Any] = []

    def plain(value: Any) -> Any:
        if isinstance(value, Exception):
            return type(value).__name__
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, tuple):  # complete_plain's (job, record)
            return (value[0].name, value[0].state)
        if hasattr(value, "job"):  # a Claim
            return (value.job.name, value.epoch)
        if hasattr(value, "kind"):  # an Event
            return (value.kind, value.to_state)
        return value

    try:
        claims = run(writer, [(queue.claim_many, w, 1) for w in workers])
        outcomes += plain(claims)
        held = {w: c[0] for w, c in zip(workers, claims, strict=True)}
        clock.advance(3)
        w0, w1, w2, w3 = workers
        step = [
            (queue.complete_plain, held[w0].job.id, w0, held[w0].epoch, {"m": 0}),
            (queue.claim_many, w0, 1),  # the same worker, its slot freed in this group
            (queue.complete_plain, held[w1].job.id, w1, held[w1].epoch, {"m": 1}),
            (queue.events, held[w1].job.id),  # a read: it sees the completion before it
        ]
        outcomes += plain(run(writer, step))
        clock.advance(1)
        failing = [
            (queue.complete_plain, held[w2].job.id, w2, held[w2].epoch, {"m": 2}),
            (queue.complete_plain, held[w3].job.id, w3, held[w3].epoch + 1, {}),  # stale
            (queue.complete_plain, held[w3].job.id, w3, held[w3].epoch, {"m": 3}),
        ]
        outcomes += plain(run(writer, failing))
    finally:
        writer.shutdown()
    with queue.db.read() as conn:
        history = [
            (r["name"], r["kind"], r["from_state"], r["to_state"], role.get(r["worker_id"]))
            for r in conn.execute(
                "SELECT j.name, e.kind, e.from_state, e.to_state, e.worker_id FROM events e"
                " JOIN jobs j ON j.id = e.job_id ORDER BY e.seq"
            ).fetchall()
        ]
        slots = {
            role[r["id"]]: r["current_job"] and queue.get_job(r["current_job"]).name
            for r in conn.execute("SELECT id, current_job FROM workers").fetchall()
        }
        usage = conn.execute("SELECT usage_h FROM fair_usage").fetchall()
    jobs = {j.name: (j.state, j.epoch, role.get(j.worker_id or "")) for j in queue.list_jobs()}
    state = {"history": history, "slots": slots, "jobs": jobs, "usage": [u[0] for u in usage]}
    queue.close()
    return outcomes, state, statements


def test_a_groups_claims_and_completions_write_what_they_would_one_by_one(
    tmp_path: Path,
) -> None:
    """Claims and completions waiting together leave their events and fair-share charges to
    the end of the group (one INSERT, one charge per submitter); a claim by a worker whose
    job completed earlier in the group still gets the slot, a read in the group sees what
    the calls before it wrote, and a group whose call fails runs again with every write in
    place once. Every outcome, event (in order), slot, job and charge is the same as with
    the calls made one by one."""
    grouped, state, statements = _scenario(tmp_path / "group", _in_one_group)
    alone, expected, _ = _scenario(tmp_path / "alone", _one_by_one)
    assert grouped == alone
    assert [name for name, kind, *_ in state["history"] if kind == "completed"] == [
        "j0",
        "j1",
        "j2",
        "j3",
    ]
    # the read in the group saw the completion made before it in the group
    assert [("added", "pending"), ("claimed", "claimed"), ("completed", "completed")] in grouped
    assert "StaleEpoch" in grouped
    assert state["history"] == expected["history"]
    assert state["slots"] == expected["slots"] and state["slots"]["w0"] == "j4"
    assert state["jobs"] == expected["jobs"]
    assert state["usage"] == pytest.approx(expected["usage"])
    assert state["usage"] and state["usage"][0] > 0
    # The first group (four claims) wrote its events in one INSERT; the second's events and
    # charge went in before the read, together; the third ran again, a savepoint per call.
    inserts = [s for s in statements if s.startswith("INSERT INTO events")]
    charges = [s for s in statements if s.startswith("INSERT INTO fair_usage")]
    assert len(inserts) == 1 + 1 + 2
    assert len(charges) == 1 + 2


PRIORITY = """
[hosts.big]
priority = 10
[hosts.small]
[[jobs]]
name = "a"
priority = 5
[[jobs]]
name = "b"
"""


@pytest.mark.parametrize("run", [_in_one_group, _one_by_one], ids=["group", "alone"])
def test_a_claim_after_a_completion_in_its_group_sees_that_worker_idle(
    tmp_path: Path, run: Any
) -> None:
    """A worker whose job completed earlier in the group is idle to the claims after it:
    a worker of a lower-priority host leaves it the next job (``claims._idle_betters``
    reads other workers' ``current_job``, so a group frees each slot at once)."""
    clock = FakeClock()
    queue = SQLiteQueue(tmp_path / "q.db", clock=clock)
    queue.reap_on_claim = False
    queue.apply_manifest(manifest_of(PRIORITY))
    big = queue.register_worker(make_cap("big"))[0].id
    small = queue.register_worker(make_cap("small"))[0].id
    held = queue.claim(big)
    assert held is not None and held.job.name == "a"
    clock.advance(1)
    writer = GroupWriter(queue.db)
    try:
        done, got = run(
            writer,
            [
                (queue.complete_plain, held.job.id, big, held.epoch, {}),
                (queue.claim_many, small, 1),
            ],
        )
    finally:
        writer.shutdown()
        queue.close()
    assert done[0].state == "completed"
    assert got == []  # "b" waits for the idle worker of the higher-priority host


def test_a_deferred_write_that_fails_inside_a_call_rolls_the_group_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes left to the group are done before another call reads. If they fail there and
    that call carries on (it caught the error), the group must not commit without them: it
    runs again, a savepoint per call, and every write lands once."""
    from trainfleet.queue import sqlite_attempts

    clock = FakeClock()
    queue = SQLiteQueue(tmp_path / "q.db", clock=clock)
    queue.reap_on_claim = False
    queue.apply_manifest(manifest_of(SIX))
    worker = queue.register_worker(make_cap("cpu-a"))[0].id
    held = queue.claim(worker)
    assert held is not None
    clock.advance(6)  # the attempt ran 6 s: 1/600 of a job-hour to charge
    charge = sqlite_attempts.charge_spans
    failures: list[str] = []

    def charge_once_failing(*args: Any) -> None:
        if not failures:
            failures.append("charge")
            raise RuntimeError("the disk is full")
        charge(*args)

    monkeypatch.setattr(sqlite_attempts, "charge_spans", charge_once_failing)

    def careless_read() -> str:
        try:
            queue.counts()  # a read: the group's deferred writes go first, and fail
        except RuntimeError as err:
            return str(err)
        return "read"

    writer = GroupWriter(queue.db)
    try:
        done, read = _in_one_group(
            writer,
            [(queue.complete_plain, held.job.id, worker, held.epoch, {}), (careless_read,)],
        )
        assert writer.retried == 1
    finally:
        writer.shutdown()
    assert failures == ["charge"] and read == "read"  # the second run read without failing
    assert done[0].state == "completed"
    kinds = [e.kind for e in queue.events(held.job.id)]
    assert kinds.count("completed") == 1
    [standing] = queue.fair_share().submitters
    assert standing.usage_h == pytest.approx(1 / 600, rel=1e-3)  # charged once
    queue.close()


def test_hot_calls_run_on_the_loop_and_wait_there_while_the_thread_holds_the_database(
    tmp_path: Path,
) -> None:
    """``call_inline``: a hot route's calls run as a group on the event loop's own thread
    when the writer thread is idle; while the thread is in a transaction they wait on the
    loop, which goes on serving (here: a callback), and run once it is done."""
    db = table_db(tmp_path)
    writer = GroupWriter(db)

    def insert_on(value: int) -> str:
        insert(db, value)
        return threading.current_thread().name

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        names = await asyncio.gather(*(writer.call_inline(loop, insert_on, v) for v in (1, 2, 3)))
        assert set(names) == {threading.current_thread().name}  # run here, on the loop
        assert writer.inline_groups == 1  # the three of one turn: one group
        many = [writer.call_inline(loop, insert_on, 100 + v) for v in range(writer.max_group + 1)]
        await asyncio.gather(*many)
        assert writer.inline_groups == 3  # at most one group a turn: the loop serves between

        started, release = threading.Event(), threading.Event()

        def hold() -> bool:
            with db.tx():  # the thread holds the database
                started.set()
                return release.wait(30)

        held = writer.submit(hold)
        assert await asyncio.to_thread(started.wait, 30)
        waiting = writer.call_inline(loop, insert_on, 4)
        served = asyncio.Event()  # the loop is not blocked: it serves what comes next
        loop.call_soon(served.set)
        await asyncio.wait_for(served.wait(), 30)
        assert not waiting.done()
        release.set()
        assert await asyncio.wait_for(waiting, 30) == threading.current_thread().name
        assert held.result(30) is True

    try:
        asyncio.run(scenario())
        with db.read() as conn:
            values = [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v").fetchall()]
        assert values == [1, 2, 3, 4, *range(100, 100 + writer.max_group + 1)]
    finally:
        writer.shutdown()
        db.close()


def test_hot_calls_left_waiting_at_shutdown_get_an_error(tmp_path: Path) -> None:
    db = SQLiteDatabase(tmp_path / "g.db")
    writer = GroupWriter(db)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        waiting = writer.call_inline(loop, lambda: 1)
        writer.shutdown()  # before the loop's next turn ran the call
        with pytest.raises(RuntimeError, match="shut down"):
            await asyncio.wait_for(waiting, 30)

    try:
        asyncio.run(scenario())
    finally:
        db.close()


def test_hot_calls_waiting_for_the_thread_are_woken_when_it_lets_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the writer thread holds the database, the loop's hot calls do not keep looking
    (each look takes the GIL the thread needs for its statements): the thread's release
    wakes them. With the fallback recheck an hour away, they still run as soon as it lets go."""
    monkeypatch.setattr(group_commit, "INLINE_RECHECK_S", 3600.0)
    db = table_db(tmp_path)
    writer = GroupWriter(db)
    started, release = threading.Event(), threading.Event()

    def hold() -> bool:
        with db.tx():
            started.set()
            return release.wait(30)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        held = writer.submit(hold)
        assert await asyncio.to_thread(started.wait, 30)
        waiting = [writer.call_inline(loop, insert, db, v) for v in (1, 2)]
        await asyncio.sleep(0)  # the drain runs, finds the database held, and waits
        assert writer._recheck is not None and not any(w.done() for w in waiting)
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*waiting), 30) == [1, 2]
        assert held.result(30) is True
        assert writer._recheck is None  # the recheck timer was cancelled, not left to fire

    try:
        asyncio.run(scenario())
        assert writer.inline_groups == 1
    finally:
        writer.shutdown()
        db.close()


def test_a_wake_after_the_loop_has_closed_is_dropped_not_raised_in_the_holder(
    tmp_path: Path,
) -> None:
    """A holder that lets the database go after the coordinator's loop closed (a shutdown
    while the writer thread finishes a call) calls the waiter the loop left: that must not
    raise in the holder's thread, after its commit."""
    db = table_db(tmp_path)
    loop = asyncio.new_event_loop()
    loop.close()
    woke: list[str] = []
    started, release = threading.Event(), threading.Event()

    thread_errors: list[BaseException] = []

    def holder() -> None:
        try:
            with db.tx() as conn:
                conn.execute("INSERT INTO t (v) VALUES (1)")
                started.set()
                assert release.wait(30)
        except BaseException as err:
            thread_errors.append(err)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert started.wait(30)
        assert not db.try_hold(lambda: group_commit._wake(loop, lambda _: woke.append("run")))
        release.set()
        thread.join(30)
        assert thread_errors == [] and woke == []  # dropped: nobody runs that loop any more
        with db.read() as conn:  # and the holder's transaction committed
            assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1
    finally:
        release.set()
        db.close()
