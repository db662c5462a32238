"""The queue's tables, and how their rows are read and written (both backends).

The converters from result rows to the backend-neutral records of ``queue.base``, and the
few row helpers every operation shares (meta values, host policies, job lookup, the event
log). Nothing here opens a transaction; callers pass a ``db.Conn`` that is already inside one
where they need atomicity. The tables themselves are made by ``migrations``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from trainfleet.capability.model import Capability
from trainfleet.capability.policy import effective_capability
from trainfleet.errors import BadRequest, NotFound
from trainfleet.manifest.spec import HostPolicy, JobSpec
from trainfleet.queue import db
from trainfleet.queue.base import (
    ArtifactRecord,
    Event,
    JobRecord,
    JobRef,
    LogLine,
    WorkerRecord,
)
from trainfleet.queue.fleet_cache import SPECS
from trainfleet.queue.notify import notify_work

M = TypeVar("M", bound=BaseModel)


def token_hash(token: str) -> str:
    """What is stored for a worker's bearer token: its SHA-256, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


# rows -> records ------------------------------------------------------------------------
def job_record(row: db.Row, **changed: Any) -> JobRecord:
    """The record of job ``row``; ``changed``: fields a write has just changed that the row
    (read before it) does not show."""
    fields = job_fields(row)
    fields.update(changed)
    for name in _TIMES:  # as validation makes them: a time stored as an integer is a float
        value = fields[name]
        if type(value) is not float and value is not None:
            fields[name] = float(value)
    return trusted(JobRecord, fields)


_TIMES = ("created_at", "updated_at", "pending_since", "claimed_at", "heartbeat_at", "finished_at")


def trusted(model: type[M], fields: dict[str, Any]) -> M:
    """``model`` holding exactly ``fields`` (every field, each of its declared type), built
    without validation: for records made from our own rows on the writer's hot path, where
    validating each (and the job's spec again inside it) cost more than the rest of making
    it (issue 9). What ``model_construct`` does, less its pass over defaults and aliases;
    ``tests/queue/test_records.py`` holds it equal to the validated model."""
    record = model.__new__(model)
    object.__setattr__(record, "__dict__", fields)
    object.__setattr__(record, "__pydantic_fields_set__", set(fields))
    object.__setattr__(record, "__pydantic_extra__", None)
    object.__setattr__(record, "__pydantic_private__", None)
    return record


def job_fields(row: db.Row) -> dict[str, Any]:
    return dict(
        id=row["id"],
        name=row["name"],
        state=row["state"],
        spec=SPECS.get(row["id"], row["spec"]),  # parsed once per stored text
        priority=row["priority"],
        attempt=row["attempt"],
        num_failures=row["num_failures"],
        epoch=row["epoch"],
        worker_id=row["worker_id"],
        host=row["host"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        pending_since=row["pending_since"],
        claimed_at=row["claimed_at"],
        heartbeat_at=row["heartbeat_at"],
        finished_at=row["finished_at"],
        in_manifest=bool(row["in_manifest"]),
        pinned=bool(row["pinned"]),
        submitted=row["origin"] == "submit",
        manifest_hash=row["manifest_hash"],
        result=json_value(row["result"]) if row["result"] else None,
        error=row["error"],
        flags=json_value(row["flags"]),
    )


def json_value(text: str) -> Any:
    """``json.loads``, without the parser for the texts most rows hold: no flags, an empty
    result (a fresh object each time: the caller may own it)."""
    if text == "[]":
        return []
    if text == "{}":
        return {}
    return json.loads(text)


def worker_record(
    row: db.Row,
    hosts: dict[str, HostPolicy],
    clock: Callable[[], float],
    offline_after_s: float,
) -> WorkerRecord:
    """An online worker not seen for ``offline_after_s`` is reported as offline."""
    cap = Capability.model_validate_json(row["capability"])
    effective, notes = effective_capability(cap, hosts.get(row["host"]))
    state = row["state"]
    if state == "online" and clock() - row["last_seen"] > offline_after_s:
        state = "offline"
    return WorkerRecord(
        id=row["id"],
        host=row["host"],
        capability=cap,
        effective=effective,
        notes=notes,
        state=state,
        registered_at=row["registered_at"],
        last_seen=row["last_seen"],
        current_job=row["current_job"],
    )


def event_record(row: db.Row) -> Event:
    return Event(**dict(row))


def log_line(row: db.Row) -> LogLine:
    return LogLine(**dict(row))


def artifact_record(row: db.Row) -> ArtifactRecord:
    d = dict(row)
    d.pop("id")
    d["capability"] = Capability.model_validate_json(d["capability"])
    return ArtifactRecord(**d)


# shared row helpers ---------------------------------------------------------------------
def read_meta(conn: db.Conn, key: str, default: str) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row["value"] if row else default


def read_hosts(conn: db.Conn) -> dict[str, HostPolicy]:
    """The host policies of the last applied manifest, by host name."""
    rows = conn.execute("SELECT name, policy FROM hosts").fetchall()
    return {r["name"]: HostPolicy.model_validate_json(r["policy"]) for r in rows}


# An event row: the job's id, and its ``seq`` read from the job's row (what the index of a
# job's events is on: migration 8).
EVENT_COLUMNS = "job_id, job_seq, at, kind, from_state, to_state, worker_id, epoch, detail"
EVENT_VALUES = "(?, (SELECT seq FROM jobs WHERE id = ?), ?, ?, ?, ?, ?, ?, ?)"


def insert_event(
    conn: db.Conn,
    at: float,
    job_id: str,
    kind: str,
    from_state: str | None,
    to_state: str | None,
    worker_id: str | None = None,
    epoch: int | None = None,
    detail: str = "",
) -> None:
    """Append one transition (or note) to a job's event log. A job (back) in pending tells
    the other coordinators of a PostgreSQL database at commit (``queue.notify``)."""
    conn.execute(
        f"INSERT INTO events ({EVENT_COLUMNS}) VALUES {EVENT_VALUES}",
        (job_id, job_id, at, kind, from_state, to_state, worker_id, epoch, detail),
    )
    if to_state == "pending":
        notify_work(conn)


EventRow = tuple[float, str, str, str | None, str | None, str | None, int | None, str]
"""One event as ``insert_events`` takes it: (at, job_id, kind, from_state, to_state,
worker_id, epoch, detail), the arguments of ``insert_event`` in its order."""


MAX_EVENTS_PER_INSERT = 500  # 4,500 parameters: far inside SQLite's and PostgreSQL's limits


def insert_events(conn: db.Conn, events: list[EventRow]) -> None:
    """``insert_event`` for each of ``events``, in their order, as ONE multi-row INSERT (a
    batch of claims writes its events in one statement instead of one each; issue 9), or
    one per ``MAX_EVENTS_PER_INSERT``."""
    if len(events) <= 1:
        for event in events:
            insert_event(conn, *event)
        return
    pending = False
    for start in range(0, len(events), MAX_EVENTS_PER_INSERT):
        chunk = events[start : start + MAX_EVENTS_PER_INSERT]
        params: list[object] = []
        for at, job, kind, from_state, to_state, worker, epoch, detail in chunk:
            params += (job, job, at, kind, from_state, to_state, worker, epoch, detail)
            pending = pending or to_state == "pending"
        values = ", ".join([EVENT_VALUES] * len(chunk))
        conn.execute(f"INSERT INTO events ({EVENT_COLUMNS}) VALUES {values}", params)
    if pending:
        notify_work(conn)


def load_job(conn: db.Conn, job_id: str) -> JobRecord:
    """The job with exactly this id, as it stands now."""
    return job_record(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


def find_job_row(conn: db.Conn, ref: str, *, lock: bool = False) -> db.Row:
    """Resolve a job reference: a full id, a name, or an unambiguous hex id prefix.

    A name several jobs had (editing a job's hyperparameters makes a new job under the same
    name) resolves to the one in the current manifest; ``same_name_refs`` lists the others.

    ``lock``: on PostgreSQL the job's row is read ``FOR UPDATE`` (locked to the end of the
    transaction), for a writer that runs beside others under the shared write lock (a
    completion): what it read is still the row when it writes it.
    """
    lock = lock and conn.dialect == db.Dialect.POSTGRES
    by_id = "SELECT * FROM jobs WHERE id = ?" + (" FOR UPDATE" if lock else "")
    row = conn.execute(by_id, (ref,)).fetchone()
    if row is not None:
        return row
    found = _find_by_name_or_prefix(conn, ref)
    row = conn.execute(by_id, (found["id"],)).fetchone() if lock else found
    if row is None:
        raise NotFound(f"no job {ref!r}")
    return row


def _find_by_name_or_prefix(conn: db.Conn, ref: str) -> db.Row:
    rows = conn.execute("SELECT * FROM jobs WHERE name = ? ORDER BY seq", (ref,)).fetchall()
    current = [r for r in rows if r["in_manifest"]]
    if len(rows) > 1 and len(current) == 1:
        return current[0]
    if not rows and len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref):
        rows = conn.execute(
            "SELECT * FROM jobs WHERE id >= ? AND id < ? ORDER BY seq LIMIT 2",
            (ref, ref + "g"),
        ).fetchall()
    if len(rows) > 1:
        names = ", ".join(f"{r['name']} ({r['id'][:12]}, {r['state']})" for r in rows)
        raise BadRequest(f"{ref!r} is ambiguous: {names}; use a longer id")
    if not rows:
        raise NotFound(f"no job {ref!r}")
    return rows[0]


def same_name_refs(conn: db.Conn, job_id: str) -> list[JobRef]:
    """The other jobs named like ``job_id``, oldest first."""
    rows = conn.execute(
        "SELECT id, name, state, in_manifest, created_at FROM jobs"
        " WHERE name = (SELECT name FROM jobs WHERE id = ?) AND id != ? ORDER BY seq",
        (job_id, job_id),
    ).fetchall()
    return [
        JobRef(
            id=r["id"],
            name=r["name"],
            state=r["state"],
            in_manifest=bool(r["in_manifest"]),
            created_at=r["created_at"],
        )
        for r in rows
    ]


# What queries read of a job's spec, kept in columns beside the JSON (``scheduling_columns``).
SPEC_COLUMNS = (
    "spec, priority, require_cuda, min_vram_gib, min_ram_gib, min_cores,"
    " kind, run_id, round, replica, timeout_s, panel, tier, allowed_hosts, submitter"
)
SPEC_SET = ", ".join(f"{c.strip()} = ?" for c in SPEC_COLUMNS.split(","))
SPEC_MARKS = ", ".join("?" for _ in SPEC_COLUMNS.split(","))  # one placeholder a column

SpecColumns = tuple[
    str, int, int, float, float, int, str, str | None, int | None, int | None, float,
    str | None, str, str | None, str,
]  # fmt: skip


def scheduling_columns(spec: JobSpec, job_id: str) -> SpecColumns:
    """The values of ``SPEC_COLUMNS`` for job ``job_id``: what a claim's SQL prefilter, the
    reaper and the run queries read, so no query parses JSON (``json_extract`` is SQLite's
    alone). ``panel`` is a referee job's submission id (its panel's jobs go to distinct
    hosts); ``allowed_hosts`` is ``host_list``'s text of the job's hosts (NULL: any host).

    ``spec`` is kept in ``SPECS`` under the text written, so the job's first claim does not
    parse it again (a rolled-back write leaves an entry no row's text matches: harmless)."""
    task = spec.replica_task
    text = spec.model_dump_json()
    SPECS.keep(job_id, text, spec)
    return (
        text,
        spec.priority,
        int(spec.require_cuda),
        spec.min_vram_gib,
        spec.min_ram_gib,
        spec.min_cores,
        spec.kind,
        task.run_id if task else None,
        task.round if task else None,
        task.replica if task else None,
        spec.timeout_s,
        spec.panel,
        spec.tier,
        host_list(spec.allowed_hosts),
        spec.submitter,
    )


def host_list(hosts: list[str]) -> str | None:
    """The ``allowed_hosts`` column: the names between commas, ``",a,b,"``, so that a claim's
    SQL skips a pinned job whose text lacks ``",HOST,"`` (``claims.host_filter``). A name
    that itself holds a comma only makes the filter let more rows through; the claim checks
    each row that passes against the spec. None (NULL) for a job any host may run."""
    return "," + ",".join(hosts) + "," if hosts else None
