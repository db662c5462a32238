"""Submit one job into the live queue (``trainfleet submit``, ``POST /v1/jobs``).

A submitted job is a row like a manifest job's, marked ``origin = 'submit'``, ``pinned = 1``
(claimable although not in the manifest) and ``in_manifest = 0``, so a reload never marks it
removed (``reload.diff_manifest`` only removes manifest jobs) and a manifest holding the same
job (same identity) adopts it. It starts 'waiting' when it names parents in ``after``.

Refused: a name a manifest job or an unfinished job holds (409: the name would mean two
jobs), an identity already in the queue (409, naming the job: it would be the same job), a
parent name no job answers to, or a parent that would close a cycle (400). Runs inside the
caller's write transaction, so the checks and the insert are atomic.
"""

from __future__ import annotations

from collections.abc import Callable

from trainfleet.errors import BadRequest, Conflict
from trainfleet.manifest.identity import job_id
from trainfleet.manifest.spec import JobSpec
from trainfleet.queue import db
from trainfleet.queue.base import JobRecord
from trainfleet.queue.deps import check_submit_cycle, parents
from trainfleet.queue.sqlite_operator import initial_state
from trainfleet.queue.sqlite_schema import (
    SPEC_COLUMNS,
    SPEC_MARKS,
    insert_event,
    load_job,
    read_meta,
    scheduling_columns,
)

ORIGIN = "submit"


def add_job(conn: db.Conn, spec: JobSpec, clock: Callable[[], float]) -> JobRecord:
    jid = job_id(spec)
    same = conn.execute("SELECT name, state FROM jobs WHERE id = ?", (jid,)).fetchone()
    if same is not None:
        raise Conflict(
            f"the queue already holds this job: {same['name']} ({jid[:12]}, {same['state']});"
            " change a field of its identity (command, hyper, ...) to submit another",
            job_id=jid,
        )
    holder = conn.execute(
        "SELECT id, state, in_manifest FROM jobs WHERE name = ? AND (in_manifest = 1 OR"
        " state NOT IN ('completed', 'failed', 'cancelled')) ORDER BY seq DESC LIMIT 1",
        (spec.name,),
    ).fetchone()
    if holder is not None:
        whose = "a manifest job" if holder["in_manifest"] else "an unfinished job"
        raise Conflict(
            f"the name {spec.name!r} is held by {whose} ({holder['id'][:12]},"
            f" {holder['state']}); pick another name",
            job_id=holder["id"],
        )
    found = parents(conn, spec.after)
    missing = [name for name in spec.after if name not in found]
    if missing:
        raise BadRequest(
            f"after: no job named {', '.join(map(repr, missing))} in the manifest or submitted"
        )
    check_submit_cycle(conn, spec.name, spec.after)
    now = clock()
    state = initial_state(spec)
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0] + 1
    conn.execute(
        f"INSERT INTO jobs (id, seq, name, state, {SPEC_COLUMNS}, created_at, updated_at,"
        " pending_since, manifest_hash, in_manifest, pinned, origin)"
        f" VALUES (?, ?, ?, ?, {SPEC_MARKS}, ?, ?, ?, ?, 0, 1, ?)",
        (
            jid,
            seq,
            spec.name,
            state,
            *scheduling_columns(spec, jid),
            now,
            now,
            now,
            read_meta(conn, "manifest_hash", ""),
            ORIGIN,
        ),
    )
    insert_event(conn, now, jid, "added", None, state, detail=f"submitted by {spec.submitter}")
    return load_job(conn, jid)
