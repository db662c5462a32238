"""One leader per database (the PostgreSQL session advisory lock), taken over when the
leader's connection dies; the LISTEN bridge that wakes a coordinator's long-poll claims.

Against the real PostgreSQL server, each test in a fresh schema; the steps are driven by
hand (``step()``), so nothing here waits on the clock except the listener, which waits on
its own notifications with a timeout."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetkit import make_cap, manifest_of
from pgkit import require_postgres
from trainfleet.coordinator.leader import (
    AdvisoryLeader,
    SoleLeader,
    dedicated_connection,
    leadership_for,
    schema_key,
)
from trainfleet.coordinator.longpoll import WorkSignal
from trainfleet.coordinator.notify import WorkListener, listen_for_work
from trainfleet.queue import open_queue
from trainfleet.queue.db import LEADER_KEY, open_database
from trainfleet.queue.notify import notify_work
from trainfleet.testing.postgres import fresh_schema
from trainfleet.testing.wait import wait_until


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema; skipped without a server, except in CI."""
    require_postgres()
    with fresh_schema() as url:
        yield url


def leader(url: str, name: str) -> AdvisoryLeader:
    return AdvisoryLeader(lambda: dedicated_connection(url), LEADER_KEY, name=name)


def terminate(url: str, pid: int) -> None:
    """Kill one server process (a dropped connection, as the server sees a dead client)."""
    with dedicated_connection(url) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]


def test_exactly_one_leads_and_another_takes_over_when_it_stops(pg_url: str) -> None:
    a, b = leader(pg_url, "a"), leader(pg_url, "b")
    try:
        assert a.step() and not b.step()
        assert (a.is_leader, b.is_leader) == (True, False)
        assert a.step() and not b.step()  # a keeps it; b keeps trying
        a.stop()  # closing the connection frees the lock (once the server has seen it)
        assert not a.is_leader
        wait_until(b.step, 10, "b to take the lock")
        assert b.term == 1
    finally:
        a.stop()
        b.stop()


def test_a_dropped_connection_loses_leadership_and_the_next_term_renews(pg_url: str) -> None:
    a, b = leader(pg_url, "a"), leader(pg_url, "b")
    try:
        assert a.step() and a.term == 1
        pid = a._conn.info.backend_pid
        terminate(pg_url, pid)
        # The check fails (once the server has acted): a stops leading before anything else.
        wait_until(lambda: not a.step(), 10, "a to notice its connection is gone")
        wait_until(b.step, 10, "b to take the lock the server freed with the session")
        assert not a.step()  # a reconnects as a follower
        b.stop()
        wait_until(a.step, 10, "a to take the lock back")
        assert a.term == 2  # a new term: the reaper renews leases once more
    finally:
        a.stop()
        b.stop()


def test_each_schema_has_its_own_leader(pg_url: str) -> None:
    with fresh_schema() as other:
        a, b = leader(pg_url, "a"), leader(other, "b")
        try:
            assert a.step() and b.step()
            assert a.key != b.key
            assert a.key == schema_key(LEADER_KEY, pg_url.rsplit("%3D", 1)[1])
        finally:
            a.stop()
            b.stop()


def test_start_leads_at_once_and_the_thread_stops(pg_url: str) -> None:
    a = leader(pg_url, "a")
    a.start()
    try:
        assert a.is_leader  # the first attempt ran in start()
    finally:
        a.stop()
    assert a._thread is not None and not a._thread.is_alive()


def test_a_queue_without_postgres_is_its_own_leader(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'q.db'}")

    class Queue:
        pass

    queue: Any = Queue()
    queue.db = db
    try:
        got = leadership_for(queue)
        assert isinstance(got, SoleLeader) and got.is_leader and got.term == 1
        assert listen_for_work(queue, lambda: None) is None
    finally:
        db.close()


# -- LISTEN/NOTIFY -------------------------------------------------------------------------


class Wakes:
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.count += 1


def test_a_committed_notify_wakes_the_listener_and_others_do_not(
    pg_url: str,
) -> None:
    db = open_database(pg_url)
    wakes = Wakes()
    listener = WorkListener(lambda: dedicated_connection(pg_url), wakes, poll_s=0.2)
    listener.start()
    try:
        wait_until(lambda: listener.connections == 1, 10, "the listener to LISTEN")
        with pytest.raises(RuntimeError), db.tx() as conn:
            notify_work(conn)
            raise RuntimeError("roll back")
        with fresh_schema() as other_url:  # another fleet's schema in the same database
            other = open_database(other_url)
            with other.tx() as conn:
                notify_work(conn)
            other.close()
        with db.tx() as conn:
            notify_work(conn)
            notify_work(conn)  # twice in one transaction: delivered once
        wait_until(lambda: listener.notifications == 1, 10, "the notification")
        with db.tx() as conn:  # a later one: the rolled-back and foreign ones came before it
            notify_work(conn)
        wait_until(lambda: listener.notifications == 2, 10, "the second notification")
        assert wakes.count == 1 + 2  # once on connecting, once per notification
    finally:
        listener.stop()
        db.close()


def test_the_listener_reconnects_and_wakes_waiters_when_its_connection_drops(
    pg_url: str,
) -> None:
    db = open_database(pg_url)
    wakes = Wakes()
    listener = WorkListener(lambda: dedicated_connection(pg_url), wakes, poll_s=0.2, retry_s=0.1)
    listener.start()
    try:
        pid = wait_until(lambda: listener.backend_pid, 10, "the listener to LISTEN")
        terminate(pg_url, pid)
        wait_until(lambda: listener.connections == 2, 10, "the listener to reconnect")
        assert wakes.count >= 2  # the reconnection woke the waiters: notifications were lost
        with db.tx() as conn:
            notify_work(conn)
        wait_until(lambda: listener.notifications == 1, 10, "a notification after it")
    finally:
        listener.stop()
        db.close()


def test_the_queue_notifies_when_work_becomes_claimable_and_only_then(pg_url: str) -> None:
    queue = open_queue(pg_url)
    listener = WorkListener(lambda: dedicated_connection(pg_url), Wakes(), poll_s=0.2)
    listener.start()
    try:
        wait_until(lambda: listener.connections == 1, 10, "the listener to LISTEN")
        queue.apply_manifest(manifest_of('[[jobs]]\nname = "a"\n\n[[jobs]]\nname = "b"\n'))
        wait_until(lambda: listener.notifications == 1, 10, "the reload's notification")
        worker, _ = queue.register_worker(make_cap("cpu-a"))
        claim = queue.claim(worker.id)
        assert claim is not None
        queue.requeue(claim.job.id)  # back in pending: claimable again
        wait_until(lambda: listener.notifications == 2, 10, "the requeue's notification")
        # The claim in between sent none: had it, the requeue's would have been the third.
        assert listener.notifications == 2
    finally:
        listener.stop()
        queue.close()


def test_work_made_claimable_by_another_coordinator_wakes_a_waiting_claim(pg_url: str) -> None:
    ours, theirs = open_queue(pg_url), open_queue(pg_url)  # two coordinators' queues

    async def scenario() -> None:
        signal = WorkSignal()  # what this coordinator's long-poll claims wait on
        signal.bind(asyncio.get_running_loop())
        listener = listen_for_work(ours, signal.notify)
        assert listener is not None
        try:
            while listener.connections < 1:  # a state, waited on with the test's timeout
                await asyncio.sleep(0.05)
            generation = signal.generation
            await asyncio.to_thread(theirs.apply_manifest, manifest_of('[[jobs]]\nname = "a"\n'))
            await signal.wait(generation, 30)
            assert signal.generation > generation  # woken, not timed out
        finally:
            await asyncio.to_thread(listener.stop)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        ours.close()
        theirs.close()
