"""Write many heartbeats in one transaction: the coordinator's flush of its heartbeat book.

The coordinator answers heartbeats from memory (``coordinator.beats``) and hands the latest
beat of each attempt here once per flush interval. Each beat is fenced in the ``WHERE``
clause (job, worker, epoch) and ``RETURNING`` says what became of the attempt, so one
statement per beat both renews the lease and tells the book about a cancel, a requeue or a
completion that happened meanwhile:

- a row comes back with an active state: the lease now runs from the beat's time;
- a row comes back ``cancelled``: the worker is told to stop at its next beat;
- no row comes back: the attempt is no longer this worker's at this epoch (requeued, reaped,
  reclaimed elsewhere): the book forgets it, and the worker's next beat is answered by the
  database (409, fenced).

An attempt's first beat (``Beat.start``: the book learned of the attempt from its claim, so
no beat of it reached the database yet) also moves the job from ``claimed`` to ``running``
and writes the ``running`` event, at the beat's time, fenced like any beat. A completion
whose first beat is still in the book writes it first, in its own transaction (``renew``),
so the job's history is the same as when every first beat went to the database.

On PostgreSQL the flush runs under the shared write lock (``Database.tx(shared=True)``),
beside claims but never beside an exclusive writer such as a requeue or the reaper.

A beat never moves a lease backwards (a coordinator start renews every lease to "now", which
may be later than a beat still in the book). The workers that beat are marked seen, and the
count of online workers comes back for the heartbeat interval (``coordinator.beats``).

SQL is the neutral subset of ``queue.db``: ``?`` placeholders, ``RETURNING``, no
``INSERT OR``, no ``json_extract``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainfleet.queue.sqlite_schema import insert_event


@dataclass(frozen=True)
class Beat:
    """The latest heartbeat of one attempt, as the coordinator received it."""

    job_id: str
    worker_id: str
    epoch: int
    at: float  # the queue clock when it arrived
    start: bool = False  # the attempt's first beat: claimed -> running, with its event


@dataclass(frozen=True)
class BeatOutcome:
    job_id: str
    epoch: int
    state: str | None  # the job's state; None: no longer this worker's attempt at this epoch


@dataclass(frozen=True)
class FlushResult:
    outcomes: list[BeatOutcome]
    online_workers: int  # workers seen within ``offline_after_s``, after this flush


_RENEW = (
    "UPDATE jobs SET"
    " heartbeat_at = CASE WHEN state IN ('claimed', 'running') AND heartbeat_at < ?"
    " THEN ? ELSE heartbeat_at END,"
    " updated_at = CASE WHEN state IN ('claimed', 'running') AND updated_at < ?"
    " THEN ? ELSE updated_at END"
    " WHERE id = ? AND worker_id = ? AND epoch = ?"
    " RETURNING state"
)
_START = (
    "UPDATE jobs SET state = 'running',"
    " heartbeat_at = CASE WHEN heartbeat_at < ? THEN ? ELSE heartbeat_at END,"
    " updated_at = CASE WHEN updated_at < ? THEN ? ELSE updated_at END"
    " WHERE id = ? AND worker_id = ? AND epoch = ? AND state = 'claimed'"
    " RETURNING state"
)
_TOUCH = (
    "UPDATE workers SET last_seen = ?, state = 'online'"
    " WHERE id = ? AND state NOT IN ('revoked', 'stopped') AND last_seen < ?"
)
_ONLINE = "SELECT COUNT(*) FROM workers WHERE state = 'online' AND last_seen >= ?"


def heartbeat_many(
    conn: Any, beats: Sequence[Beat], now: float, offline_after_s: float
) -> FlushResult:
    """Renew the lease of every beat still fenced-valid; run inside one write transaction.

    ``conn`` is a connection inside the caller's transaction (sqlite3 or ``queue.db.Conn``).
    """
    outcomes = renew(conn, beats)
    online = conn.execute(_ONLINE, (now - offline_after_s,)).fetchone()[0]
    return FlushResult(outcomes, int(online))


def renew(conn: Any, beats: Sequence[Beat]) -> list[BeatOutcome]:
    """Write ``beats`` (fenced; a start beat moves its job to ``running``, with the event)
    and mark their workers seen, inside the caller's write transaction."""
    outcomes = []
    seen: dict[str, float] = {}
    # Rows in a fixed order: two coordinators flushing at once never deadlock on PostgreSQL.
    for beat in sorted(beats, key=lambda b: b.job_id):
        fence = (beat.at, beat.at, beat.at, beat.at, beat.job_id, beat.worker_id, beat.epoch)
        row = conn.execute(_START, fence).fetchone() if beat.start else None
        if row is not None:
            insert_event(
                conn,
                beat.at,
                beat.job_id,
                "running",
                "claimed",
                "running",
                beat.worker_id,
                beat.epoch,
            )
        else:
            row = conn.execute(_RENEW, fence).fetchone()
        outcomes.append(BeatOutcome(beat.job_id, beat.epoch, None if row is None else row[0]))
        seen[beat.worker_id] = max(beat.at, seen.get(beat.worker_id, beat.at))
    if seen:
        conn.executemany(_TOUCH, [(at, wid, at) for wid, at in sorted(seen.items())])
    return outcomes
