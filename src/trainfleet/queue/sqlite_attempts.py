"""The life of one attempt on the SQLite queue: claim, report, finish, or be reaped.

A claim (``claims``) picks the first pending job (by priority, then manifest order) that the
worker's effective capability fits and no scheduling rule defers, and bumps the job's
*epoch*; asking again is idempotent. Every
later write of that attempt (heartbeat, log lines, artifact, complete, fail) names the epoch
and is *fenced*: it is refused with ``StaleEpoch`` once the attempt has been written off, so a
worker that lost its claim can never overwrite the attempt that replaced it. A replica task
of a collaborative run also waits briefly for the worker that had its slot last round
(``affinity_wait``). ``reap_jobs`` writes off attempts whose heartbeats stopped or that ran
past their timeout.

Each function runs on a connection the caller has already put inside a write transaction,
and ``clock`` is the queue's clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from trainfleet.capability.model import Capability
from trainfleet.capability.policy import effective_capability
from trainfleet.errors import ApiError, BadRequest, Conflict, NotFound, StaleEpoch
from trainfleet.manifest.spec import JobSpec
from trainfleet.queue.base import (
    ACTIVE_STATES,
    ArtifactRecord,
    HeartbeatReply,
    JobRecord,
)
from trainfleet.queue.beats import Beat, renew
from trainfleet.queue.db import Conn, Dialect, Row
from trainfleet.queue.fairshare import charge_spans, charged_from
from trainfleet.queue.fleet_cache import SPECS
from trainfleet.queue.ledger import shard_reports
from trainfleet.queue.log_quota import admit_lines
from trainfleet.queue.sqlite_data import check_shards
from trainfleet.queue.sqlite_schema import (
    EventRow,
    artifact_record,
    find_job_row,
    insert_event,
    insert_events,
    job_record,
    json_value,
    load_job,
    read_hosts,
)
from trainfleet.queue.sqlite_workers import release_worker, touch

Item = TypeVar("Item")
Out = TypeVar("Out")

MAX_LOG_LINE_CHARS = 4096  # what is kept of each log line
AFFINITY_WAIT_S = 2.0  # a replica task waits this long for its slot's previous worker
# What SQLite and PostgreSQL integers hold: a worker's epoch outside it never reaches the SQL.
SQL_INTEGERS = range(-(2**63), 2**63)


def fenced(conn: Conn, job_id: str, worker_id: str, epoch: int) -> Row:
    """The job's row, if ``worker_id`` still holds it at ``epoch`` and it is still active."""
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return _check_fence(row, job_id, worker_id, epoch)


def _check_fence(row: Row | None, job_id: str, worker_id: str, epoch: int) -> Row:
    """``fenced`` on a row the caller already read."""
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    if row["epoch"] != epoch or row["worker_id"] != worker_id:
        raise StaleEpoch(
            f"epoch {epoch} of job {row['name']} is stale (current epoch {row['epoch']});"
            " this claim was written off and the job handed elsewhere",
            current_epoch=row["epoch"],
        )
    if row["state"] == "cancelled":
        raise Conflict(f"job {row['name']} was cancelled; nothing more is accepted for it")
    if row["state"] not in ACTIVE_STATES:
        raise Conflict(f"job {row['name']} is {row['state']}, not active")
    return row


# Claiming (claim, _take, redelivery) lives in ``claims``.


def heartbeat(
    conn: Conn,
    job_id: str,
    worker_id: str,
    epoch: int,
    clock: Callable[[], float],
    *,
    touched: bool = False,
    events: list[EventRow] | None = None,
) -> HeartbeatReply:
    """``touched``: the caller marked the worker seen in this transaction already;
    ``events``: where a batch of beats collects its events, to write them at once.

    The usual beats are one fenced UPDATE each, no read first (issue 9): the attempt's first
    (claimed -> running, with its event), then a later one (running). Only a beat neither
    matches reads the row, to say why (cancelled, stale, not found)."""
    if not touched:
        touch(conn, worker_id, clock())
    for before in ("claimed", "running") if epoch in SQL_INTEGERS else ():
        now = clock()
        beat = conn.execute(
            "UPDATE jobs SET heartbeat_at = ?, state = 'running', updated_at = ?"
            " WHERE id = ? AND epoch = ? AND worker_id = ? AND state = ?",
            (now, now, job_id, epoch, worker_id, before),
        )
        if beat.rowcount == 1:
            if before == "claimed":
                event = (now, job_id, "running", "claimed", "running", worker_id, epoch, "")
                if events is None:
                    insert_events(conn, [event])
                else:
                    events.append(event)
            return HeartbeatReply(cancel=False, state="running")
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if (
        row is not None
        and row["state"] == "cancelled"
        and row["epoch"] == epoch
        and row["worker_id"] == worker_id
    ):
        return HeartbeatReply(cancel=True, state="cancelled")
    row = _check_fence(row, job_id, worker_id, epoch)
    now = clock()
    state = row["state"]
    if state == "claimed":
        state = "running"
        insert_event(conn, clock(), job_id, "running", "claimed", "running", worker_id, epoch)
    conn.execute(
        "UPDATE jobs SET heartbeat_at = ?, state = ?, updated_at = ? WHERE id = ?",
        (now, state, now, job_id),
    )
    return HeartbeatReply(cancel=False, state=state)


def append_log(
    conn: Conn,
    job_id: str,
    worker_id: str,
    epoch: int,
    lines: list[str],
    clock: Callable[[], float],
) -> int:
    row = fenced(conn, job_id, worker_id, epoch)
    now = clock()
    cut = [line[:MAX_LOG_LINE_CHARS] for line in lines]
    kept = admit_lines(conn, job_id, row["attempt"], cut, now=now, worker_id=worker_id, epoch=epoch)
    conn.executemany(
        "INSERT INTO logs (job_id, attempt, epoch, at, line) VALUES (?, ?, ?, ?, ?)",
        [(job_id, row["attempt"], epoch, now, line) for line in kept],
    )
    return len(kept)


def record_artifact(
    conn: Conn,
    job_id: str,
    worker_id: str,
    epoch: int,
    sha256: str,
    size: int,
    name: str,
    clock: Callable[[], float],
) -> ArtifactRecord:
    """Record an uploaded artifact with the provenance of the attempt that made it.

    Idempotent: the same attempt uploading the same bytes again (its reply was lost) gets
    the record it already has.
    """
    row = fenced(conn, job_id, worker_id, epoch)
    again = conn.execute(
        "SELECT * FROM artifacts WHERE job_id = ? AND epoch = ? AND sha256 = ?",
        (job_id, epoch, sha256),
    ).fetchone()
    if again is not None:
        return artifact_record(again)
    wrow = conn.execute("SELECT * FROM workers WHERE id = ?", (worker_id,)).fetchone()
    cap, _ = effective_capability(
        Capability.model_validate_json(wrow["capability"]),
        read_hosts(conn).get(wrow["host"]),
    )
    record = ArtifactRecord(
        sha256=sha256,
        size=size,
        name=name,
        job_id=job_id,
        attempt=row["attempt"],
        epoch=epoch,
        worker_id=worker_id,
        capability=cap,
        manifest_hash=row["manifest_hash"],
        created_at=clock(),
    )
    conn.execute(
        "INSERT INTO artifacts (sha256, size, name, job_id, attempt, epoch, worker_id,"
        " capability, manifest_hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            sha256,
            size,
            name,
            job_id,
            record.attempt,
            epoch,
            worker_id,
            cap.model_dump_json(),
            record.manifest_hash,
            record.created_at,
        ),
    )
    insert_event(
        conn,
        clock(),
        job_id,
        "artifact",
        None,
        None,
        worker_id,
        epoch,
        f"{name} {sha256[:12]} ({size} bytes)",
    )
    return record


def complete(
    conn: Conn,
    job_id: str,
    worker_id: str,
    epoch: int,
    result: dict[str, Any],
    clock: Callable[[], float],
    *,
    row: Row | None = None,
    later: Later | None = None,
    start: Beat | None = None,
) -> JobRecord:
    """Complete the attempt (fenced); ``row``: the job's row, if the caller just read it in
    this transaction; ``later``: where a batch collects the completion's event and worker
    slot, written for all its items at once (``Later.write``) when no shard check follows.

    ``start``: the attempt's first beat, still unwritten (the coordinator's heartbeat book
    held it), folded into the completion's one UPDATE: its lease renewal, and for a job
    still ``claimed`` its ``running`` event before the ``completed`` one. The rows and
    events are those of the beat written first (``queue.beats.renew``), in one statement
    fewer and without reading the row twice (issue 9)."""
    if row is None:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if (
        row is not None
        and row["state"] == "completed"
        and (row["epoch"], row["worker_id"]) == (epoch, worker_id)
        and row["result"] is not None
        and json.loads(row["result"]) == result
    ):
        return job_record(row)  # the same report again: its reply was lost
    row = _check_fence(row, job_id, worker_id, epoch)
    now = clock()
    beat_at = -math.inf if start is None else start.at
    # Fenced in the WHERE clause too: on a backend where claims run beside this transaction
    # the row is re-checked as it is written, never completed for a written-off attempt.
    # Only the column the row read above cannot tell is returned: a RETURNING * of the
    # whole row cost more than the rest of the statement (issue 9).
    stored = json.dumps(result)
    done = conn.execute(
        "UPDATE jobs SET state = 'completed', result = ?, finished_at = ?, updated_at = ?,"
        " heartbeat_at = CASE WHEN heartbeat_at < ? THEN ? ELSE heartbeat_at END"
        " WHERE id = ? AND epoch = ? AND worker_id = ? AND state IN ('claimed', 'running')"
        " RETURNING heartbeat_at",
        (stored, now, now, beat_at, beat_at, job_id, epoch, worker_id),
    ).fetchone()
    if done is None:
        raise StaleEpoch(
            f"epoch {epoch} of job {row['name']} was written off while it completed",
            current_epoch=row["epoch"],
        )
    was = row["state"]
    events: list[EventRow] = []
    if start is not None and was == "claimed":  # the first beat's move, as renew writes it
        events.append((start.at, job_id, "running", "claimed", "running", worker_id, epoch, ""))
        was = "running"
    events.append((clock(), job_id, "completed", was, "completed", worker_id, epoch, ""))
    used = (row["submitter"], charged_from(row, now), now)  # the attempt's uncharged time
    # Shard hashes are checked only where there is something to check: a job with a dataset,
    # or a result reporting hashes anyway (noted on the job).
    has_data = SPECS.get(job_id, row["spec"]).trained_dataset is not None
    record = job_record(
        row,
        state="completed",
        result=json_value(stored),  # as a later read finds it, not the caller's object
        finished_at=now,
        updated_at=now,
        heartbeat_at=done["heartbeat_at"],
    )
    if later is not None:
        if not has_data and not shard_reports(result):
            later.events.extend(events)
            if later.free_slots_later:
                later.released.append((worker_id, job_id))
            else:
                release_worker(conn, worker_id, job_id)
            later.used.append(used)
            return record
        later.write(conn)  # what was left goes first: the events stay in their order
    release_worker(conn, worker_id, job_id)
    insert_events(conn, events)
    charge_spans(conn, used[0], [used[1:]])
    if (has_data or shard_reports(result)) and check_shards(
        conn, job_id, worker_id, epoch, result, now
    ):
        return load_job(conn, job_id)  # flagged: the flags are on the row now
    return record


@dataclass
class Later:
    """What several completions and claims write once for all (issue 9): their events in one
    multi-row INSERT, in the order they came; the attempts' time charged to their submitters
    (``fairshare``), once per submitter; and, for a batch of one worker's completions
    (``free_slots_later``), the worker's slot freed once. None of it is read by a later item
    of the batch, nor by a later claim or completion of a group commit
    (``SQLiteDatabase.group``), so the writes are the same as one by one. A group frees each
    slot at once: a claim reads other workers' ``current_job`` (an idle worker of a
    higher-priority host is left the job: ``claims._idle_betters``), and each completion of a
    group is another worker's anyway.

    A write that fails marks it ``failed``: the caller must not commit what it holds (a
    group runs again, a call at a time)."""

    free_slots_later: bool = True
    events: list[EventRow] = field(default_factory=list)
    released: list[tuple[str, str]] = field(default_factory=list)  # (worker id, job id)
    used: list[tuple[str, float, float]] = field(default_factory=list)  # (submitter, from, to)
    failed: bool = False

    def clear(self) -> None:
        self.events.clear()
        self.released.clear()
        self.used.clear()

    def write(self, conn: Conn) -> None:
        """Write what was left, and forget it."""
        events, released, used = self.events, self.released, self.used
        self.events, self.released, self.used = [], [], []
        try:
            insert_events(conn, events)
            jobs_of: dict[str, list[str]] = {}
            for worker_id, job_id in released:
                jobs_of.setdefault(worker_id, []).append(job_id)
            for worker_id, job_ids in jobs_of.items():
                marks = ", ".join("?" * len(job_ids))
                conn.execute(
                    "UPDATE workers SET current_job = NULL"
                    f" WHERE id = ? AND current_job IN ({marks})",
                    (worker_id, *job_ids),
                )
            for submitter in sorted({s for s, _, _ in used}):  # rows locked in one order
                charge_spans(conn, submitter, [(a, b) for s, a, b in used if s == submitter])
        except BaseException:
            self.failed = True
            raise


def complete_plain(
    conn: Conn,
    job_ref: str,
    worker_id: str,
    epoch: int,
    result: dict[str, Any],
    clock: Callable[[], float],
    start: Beat | None = None,
    later: Later | None = None,
) -> tuple[JobRecord, JobRecord | None]:
    """A completion in ONE transaction: the job (by reference), the result's artifact checked
    (uploaded by this very attempt), the attempt's first beat if the coordinator's heartbeat
    book still holds it (``start``: claimed -> running, with its event), and the completion.

    Returns ``(job, record)``; ``record`` is None, and nothing is written, for a job whose
    completion needs slow work first (a dataset's shard plan, a replica task's judging)."""
    row = find_job_row(conn, job_ref, lock=True)  # on PostgreSQL: beside claims and beats
    job_id = row["id"]
    spec = SPECS.get(job_id, row["spec"])
    artifact = result.get("artifact")
    if artifact is not None:
        bound = (
            isinstance(artifact, str)
            and conn.execute(
                "SELECT 1 FROM artifacts WHERE job_id = ? AND epoch = ? AND sha256 = ?",
                (job_id, epoch, artifact),
            ).fetchone()
        )
        if not bound:
            raise BadRequest(f"result names artifact {artifact!r}, not uploaded by this attempt")
    if spec.kind == "replica" or spec.trained_dataset is not None:
        return job_record(row), None
    if start is not None and (start.job_id, start.worker_id, start.epoch) != (
        job_id,
        worker_id,
        epoch,
    ):
        start = None  # another attempt's beat: fenced, as renew would find it
    record = complete(
        conn, job_id, worker_id, epoch, result, clock, row=row, later=later, start=start
    )
    return record, record


def fail(
    conn: Conn,
    job_id: str,
    worker_id: str,
    epoch: int,
    error: str,
    clock: Callable[[], float],
    *,
    retryable: bool,
    release: bool,
) -> JobRecord:
    row = fenced(conn, job_id, worker_id, epoch)
    release_worker(conn, worker_id, job_id)
    kind = "released" if release else "attempt_failed"
    _end_attempt(conn, row, error, clock, count=not release, retryable=retryable, kind=kind)
    return load_job(conn, job_id)


def _end_attempt(
    conn: Conn,
    row: Row,
    error: str,
    clock: Callable[[], float],
    *,
    count: bool,
    retryable: bool,
    kind: str,
) -> None:
    """Close the active attempt: back to pending, or failed when attempts are used up. Its
    time is charged to its submitter, and a job back to pending takes the submitter's
    fair-share level at once (the charge read it)."""
    now = clock()
    fair = charge_spans(conn, row["submitter"], [(charged_from(row, now), now)])
    failures = row["num_failures"] + int(count)
    spec = SPECS.get(row["id"], row["spec"])
    max_failures = spec.max_failures
    round_over = _round_over(conn, spec)
    if round_over:  # a replica task whose round has closed: rerunning it is wasted work
        to_state, finished = "cancelled", now
        detail = f"{error} (not requeued: {round_over})"
    elif retryable and failures < max_failures:
        to_state, finished = "pending", None
        detail = f"{error} (failure {failures}/{max_failures}; requeued)" if count else error
    else:
        to_state, finished = "failed", now
        why = "not retryable" if not retryable else f"{failures}/{max_failures} failures"
        detail = f"{error} ({why})"
    conn.execute(
        "UPDATE jobs SET state = ?, num_failures = ?, worker_id = CASE WHEN ? = 'pending'"
        " THEN NULL ELSE worker_id END, pending_since = ?, finished_at = ?, updated_at = ?,"
        " error = ?, fair = ? WHERE id = ?",
        (to_state, failures, to_state, now, finished, now, error, fair, row["id"]),
    )
    insert_event(
        conn,
        clock(),
        row["id"],
        kind,
        row["state"],
        to_state,
        row["worker_id"],
        row["epoch"],
        detail,
    )


def _round_over(conn: Conn, spec: JobSpec) -> str:
    """For a replica task, why its round takes no more attempts ('' while it does)."""
    task = spec.replica_task
    if task is None:
        return ""
    run = conn.execute("SELECT state, round FROM runs WHERE id = ?", (task.run_id,)).fetchone()
    if run is None:
        return ""
    if run["state"] in ("completed", "superseded"):
        return f"run {task.run} is {run['state']}"
    if task.round < run["round"]:
        return f"round {task.round} of run {task.run} has closed"
    return ""


def overdue_jobs(conn: Conn, now: float, heartbeat_timeout_s: float) -> list[str]:
    """Ids of active jobs that look lost or timed out; cheap enough to run outside the lock."""
    rows = conn.execute(
        "SELECT id FROM jobs WHERE state IN ('claimed', 'running') AND heartbeat_at < ?"
        " UNION SELECT id FROM jobs WHERE state IN ('claimed', 'running')"
        " AND claimed_at + timeout_s + ? < ?",
        (now - heartbeat_timeout_s, heartbeat_timeout_s, now),
    ).fetchall()
    return [jid for (jid,) in rows]


def reap_jobs(
    conn: Conn,
    job_ids: list[str],
    now: float,
    heartbeat_timeout_s: float,
    clock: Callable[[], float],
) -> list[JobRecord]:
    """Re-check each of ``job_ids`` under the lock and write off the attempts really lost."""
    deadline = now - heartbeat_timeout_s
    reaped = []
    for jid in job_ids:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (jid,)).fetchone()
        if row["state"] not in ACTIVE_STATES:
            continue
        timeout_s = SPECS.get(jid, row["spec"]).timeout_s
        if row["heartbeat_at"] < deadline:
            silent_s = now - row["heartbeat_at"]
            why = f"lost: no heartbeat for {silent_s:.0f}s from {row['worker_id']}"
        elif now > row["claimed_at"] + timeout_s + heartbeat_timeout_s:
            why = f"timed out after {timeout_s:g}s on {row['worker_id']}"
        else:
            continue
        release_worker(conn, row["worker_id"], jid)
        _end_attempt(conn, row, why, clock, count=True, retryable=True, kind="lost")
        reaped.append(load_job(conn, jid))
    return reaped


def affinity_wait(
    conn: Conn,
    spec: JobSpec,
    worker_id: str,
    pending_for_s: float,
    now: float,
    offline_after_s: float,
) -> str | None:
    """Why ``worker_id`` should leave this replica task to its slot's previous worker now.

    Round r's task for slot k waits up to ``AFFINITY_WAIT_S`` after it became pending for the
    worker whose slot-k contribution was accepted in round r-1, while that worker is online,
    so that worker keeps its inner optimizer state (DiLoCo replicas keep AdamW state).
    """
    task = spec.replica_task
    if task is None or task.round == 0 or pending_for_s >= AFFINITY_WAIT_S:
        return None
    row = conn.execute(
        "SELECT c.worker_id, w.state, w.last_seen FROM contributions c JOIN workers w"
        " ON w.id = c.worker_id WHERE c.run_id = ? AND c.round = ? AND c.replica = ?"
        " AND c.status IN ('accepted', 'applied') ORDER BY c.created_at DESC LIMIT 1",
        (task.run_id, task.round - 1, task.replica),
    ).fetchone()
    if row is None or row["worker_id"] == worker_id:
        return None
    if row["state"] != "online" or now - row["last_seen"] > offline_after_s:
        return None
    return f"kept for worker {row['worker_id']} (it has slot {task.replica}'s optimizer state)"


def complete_many(
    conn: Conn,
    worker_id: str,
    items: list[tuple[str, int, dict[str, Any]]],
    clock: Callable[[], float],
    starts: Sequence[Beat] = (),
) -> list[JobRecord | ApiError]:
    """``complete`` each ``(job_id, epoch, result)`` in one transaction, each item inside its
    own savepoint: an item refused (fenced, not found...) is rolled back alone and returned
    as its error, in place of its record. ``starts``: first beats of these attempts still in
    the coordinator's heartbeat book, written first (``queue.beats.renew``)."""
    if starts:
        renew(conn, starts)
    return each_item(
        conn, items, lambda item: complete(conn, item[0], worker_id, item[1], item[2], clock)
    )


def complete_plain_many(
    conn: Conn,
    worker_id: str,
    items: list[tuple[str, int, dict[str, Any]]],
    clock: Callable[[], float],
    starts: dict[str, Beat],
) -> list[tuple[JobRecord, JobRecord | None] | ApiError]:
    """``complete_plain`` each ``(job_ref, epoch, result)`` in one transaction, each item in
    its own savepoint: an item refused (fenced, not found...) is rolled back alone and
    returned as its error. ``starts``: first beats still in the heartbeat book, by job id.
    A clean batch writes its events and frees the worker's slot once (``Later``).

    On PostgreSQL, where completions run beside heartbeat flushes and other completions
    (under the shared write lock), the batch's job rows are locked first, all at once, in id
    order: the order the flush locks its rows in (``beats.renew``). Locked item by item, in
    the worker's order, a batch and a flush deadlocked (``bench.queue``'s ``pgbatched`` arm:
    PostgreSQL aborted one after its 1 s deadlock check, p99 claim 1 s)."""
    if conn.dialect == Dialect.POSTGRES and len(items) > 1:
        ids = sorted({ref for ref, _, _ in items})
        marks = ", ".join("?" * len(ids))
        conn.execute(f"SELECT 1 FROM jobs WHERE id IN ({marks}) ORDER BY id FOR UPDATE", ids)
    later = Later()

    def one(i: tuple[str, int, dict[str, Any]]) -> tuple[JobRecord, JobRecord | None]:
        return complete_plain(conn, i[0], worker_id, i[1], i[2], clock, starts.get(i[0]), later)

    def alone(i: tuple[str, int, dict[str, Any]]) -> tuple[JobRecord, JobRecord | None]:
        later.clear()  # the batch was rolled back: each item now writes its own
        return complete_plain(conn, i[0], worker_id, i[1], i[2], clock, starts.get(i[0]))

    out = each_item(conn, items, one, alone)
    later.write(conn)
    return out


def each_item(
    conn: Conn,
    items: Sequence[Item],
    one: Callable[[Item], Out],
    alone: Callable[[Item], Out] | None = None,
) -> list[Out | ApiError]:
    """``one(item)`` for each item, in order, in the caller's transaction; an item refused
    (an ``ApiError``) is rolled back alone and returned as its error, in its place.

    Optimistic, since refusals are rare: the whole batch runs in ONE savepoint, and only if
    an item is refused is it all rolled back and run again with a savepoint per item (by
    ``alone``, default ``one``), which gives exactly the answers and writes of a savepoint
    per item from the start. That saves two statements per item of a clean batch."""
    conn.execute("SAVEPOINT batch")
    try:
        out: list[Out | ApiError] = [one(item) for item in items]
    except ApiError:
        conn.execute("ROLLBACK TO SAVEPOINT batch")
        conn.execute("RELEASE SAVEPOINT batch")
        return [_alone(conn, alone or one, item) for item in items]
    conn.execute("RELEASE SAVEPOINT batch")
    return out


def _alone(conn: Conn, one: Callable[[Item], Out], item: Item) -> Out | ApiError:
    conn.execute("SAVEPOINT item")
    try:
        got: Out | ApiError = one(item)
    except ApiError as err:
        conn.execute("ROLLBACK TO SAVEPOINT item")
        got = err
    conn.execute("RELEASE SAVEPOINT item")
    return got
