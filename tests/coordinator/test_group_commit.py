"""Group commit (``coordinator.group_commit``): queue calls waiting together share one
transaction; a call that fails is rolled back alone and gets its own error."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from trainfleet.coordinator.group_commit import GroupWriter
from trainfleet.coordinator.writer import run_on
from trainfleet.queue.db import SQLiteDatabase


def insert(db: SQLiteDatabase, value: int) -> int:
    with db.tx() as conn:
        conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
    return value


def insert_then_fail(db: SQLiteDatabase, value: int) -> None:
    with db.tx() as conn:
        conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
        raise ValueError(f"refused {value}")


def test_waiting_calls_commit_together_and_a_failure_rolls_back_alone(tmp_path: Path) -> None:
    db = SQLiteDatabase(tmp_path / "g.db")
    with db.tx() as conn:
        conn.execute("CREATE TABLE t (v INTEGER)")
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
    db = SQLiteDatabase(tmp_path / "g.db")
    with db.tx() as conn:
        conn.execute("CREATE TABLE t (v INTEGER)")
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
    db = SQLiteDatabase(tmp_path / "g.db")
    with db.tx() as conn:
        conn.execute("CREATE TABLE t (v INTEGER)")
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
