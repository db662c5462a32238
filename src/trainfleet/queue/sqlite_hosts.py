"""Host enrollment and revocation in the SQLite queue.

A host is enrolled by name and gets a join token bound to that name; only the token's hash
is kept. A worker registering with it becomes a worker of that host whatever it calls
itself (an explicit different host name is refused). Rotating a host replaces its token;
revoking a host revokes its token and every worker of it; revoking a worker revokes its
credential alone. A revoked worker's active job is requeued in the same transaction, with
a ``revoked`` event, and its next request is refused: authentication is a lookup by token
hash on every request, so nothing outlives a revoke.

In open mode (``serve --open-join``) a worker with the shared join token is registered as
``open:<the host it claims>``, a name no manifest policy and no enrollment can have.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from trainfleet.capability.model import (
    OPEN_HOST_PREFIX,
    Capability,
    is_assigned_host_name,
    is_host_name,
    policy_host_name,
)
from trainfleet.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from trainfleet.queue.base import HostRecord, JobRecord, WorkerRecord
from trainfleet.queue.db import Conn
from trainfleet.queue.fairshare import charge_ended
from trainfleet.queue.sqlite_schema import insert_event, load_job, token_hash
from trainfleet.queue.sqlite_workers import register_worker


def _check_name(name: str, *, open_ok: bool = False) -> None:
    """The one host-name policy, whole-string (a trailing newline is not a name)."""
    if not (is_assigned_host_name(name) if open_ok else is_host_name(name)):
        raise BadRequest(
            f"invalid host name {name[:80]!r}: 1-63 characters of letters, digits, '.', '_'"
            " or '-', starting with a letter or digit"
            + (" (or open:NAME for a host that joined in open mode)" if open_ok else "")
        )


def enroll_host(conn: Conn, name: str, now: float) -> str:
    """Enroll ``name`` (or re-enroll a revoked one); returns the new join token."""
    _check_name(name)
    row = conn.execute("SELECT state FROM enrollments WHERE host = ?", (name,)).fetchone()
    if row is not None and row["state"] == "active":
        raise Conflict(
            f"host {name} is already enrolled; `trainfleet hosts rotate {name}` issues a new token"
        )
    token = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO enrollments (host, token_hash, state, enrolled_at, rotated_at)"
        " VALUES (?, ?, 'active', ?, ?) ON CONFLICT (host) DO UPDATE SET"
        " token_hash = excluded.token_hash, state = 'active', enrolled_at = excluded.enrolled_at,"
        " rotated_at = excluded.rotated_at, revoked_at = NULL",
        (name, token_hash(token), now, now),
    )
    return token


def rotate_host(
    conn: Conn, name: str, now: float, *, revoke_workers: bool
) -> tuple[str, list[JobRecord]]:
    """A new token for an enrolled host; the old one is refused from now on."""
    _check_name(name)
    row = conn.execute("SELECT state FROM enrollments WHERE host = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"host {name!r} is not enrolled")
    if row["state"] != "active":
        raise Conflict(f"host {name} is revoked; `trainfleet hosts enroll {name}` enrolls it again")
    token = secrets.token_urlsafe(32)
    conn.execute(
        "UPDATE enrollments SET token_hash = ?, rotated_at = ? WHERE host = ?",
        (token_hash(token), now, name),
    )
    requeued = _revoke_workers(conn, "host = ?", name, now, "rotated") if revoke_workers else []
    return token, requeued


def revoke_host(conn: Conn, name: str, now: float) -> list[JobRecord]:
    """Revoke the host's enrollment (if any) and every worker registered as it."""
    _check_name(name, open_ok=True)
    cur = conn.execute(
        "UPDATE enrollments SET state = 'revoked', revoked_at = ? WHERE host = ?", (now, name)
    )
    known = conn.execute("SELECT 1 FROM workers WHERE host = ? LIMIT 1", (name,)).fetchone()
    if cur.rowcount == 0 and known is None:
        raise NotFound(f"no host {name!r} (neither enrolled nor with workers)")
    return _revoke_workers(conn, "host = ?", name, now, f"host {name} revoked")


def revoke_worker(conn: Conn, worker_id: str, now: float) -> list[JobRecord]:
    if conn.execute("SELECT 1 FROM workers WHERE id = ?", (worker_id,)).fetchone() is None:
        raise NotFound(f"no worker {worker_id!r}")
    return _revoke_workers(conn, "id = ?", worker_id, now, f"worker {worker_id} revoked")


def _revoke_workers(conn: Conn, where: str, value: str, now: float, why: str) -> list[JobRecord]:
    """Mark the matching workers revoked and requeue their active jobs (no failure counted:
    the job did nothing wrong). The epoch is bumped, so a late write is fenced too."""
    ids = [
        r["id"]
        for r in conn.execute(
            f"SELECT id FROM workers WHERE {where} AND state != 'revoked'", (value,)
        )
    ]
    requeued = []
    for worker_id in ids:
        conn.execute(
            "UPDATE workers SET state = 'revoked', current_job = NULL WHERE id = ?", (worker_id,)
        )
        jobs = conn.execute(
            "SELECT id, state, submitter, claimed_at, charged_at FROM jobs"
            " WHERE worker_id = ? AND state IN ('claimed', 'running')",  # jobs_by_worker's
            (worker_id,),
        ).fetchall()
        for job in jobs:
            charge_ended(conn, job, now)
            conn.execute(
                "UPDATE jobs SET state = 'pending', epoch = epoch + 1, worker_id = NULL,"
                " host = NULL, pending_since = ?, updated_at = ? WHERE id = ?",
                (now, now, job["id"]),
            )
            insert_event(
                conn,
                now,
                job["id"],
                "revoked",
                job["state"],
                "pending",
                worker_id,
                detail=f"{why}: its credential was revoked; requeued",
            )
            requeued.append(load_job(conn, job["id"]))
    return requeued


def list_hosts(conn: Conn, now: float, offline_after_s: float) -> list[HostRecord]:
    """Enrolled hosts; a worker counts as online by the rule of ``worker_record`` (online and
    seen within ``offline_after_s``), so this agrees with ``trainfleet workers``."""
    rows = conn.execute(
        "SELECT e.*, (SELECT COUNT(*) FROM workers w WHERE w.host = e.host"
        " AND w.state = 'online' AND w.last_seen >= ?) AS workers_online"
        " FROM enrollments e ORDER BY e.host",
        (now - offline_after_s,),
    ).fetchall()
    return [
        HostRecord(
            name=r["host"],
            state=r["state"],
            enrolled_at=r["enrolled_at"],
            rotated_at=r["rotated_at"],
            revoked_at=r["revoked_at"],
            workers_online=r["workers_online"],
        )
        for r in rows
    ]


def authenticate_host(conn: Conn, token: str) -> str:
    """The host whose active join token ``token`` is."""
    row = conn.execute(
        "SELECT host, state FROM enrollments WHERE token_hash = ?", (token_hash(token),)
    ).fetchone()
    if row is None:
        raise Unauthorized(
            "unknown join token: enroll this host with `trainfleet hosts enroll NAME` and join"
            " with that token (a rotated token stops working)"
        )
    if row["state"] != "active":
        raise Unauthorized(f"the enrollment of host {row['host']} was revoked by the operator")
    return str(row["host"])


def register_enrolled(
    conn: Conn,
    capability: Capability,
    token: str,
    clock: Callable[[], float],
    offline_after_s: float,
) -> tuple[WorkerRecord, str]:
    """Register as the host ``token`` is enrolled for, checked inside the write lock."""
    host = authenticate_host(conn, token)
    # A worker that did not name a host reports its hostname; one that named another host
    # on purpose is refused rather than silently renamed.
    if capability.host not in (host, policy_host_name(capability.hostname)):
        raise Forbidden(
            f"this token is enrolled for host {host}, not {capability.host}"
            f" (drop --host, or pass --host {host})"
        )
    return register_worker(
        conn, capability.model_copy(update={"host": host}), clock, offline_after_s
    )


def register_open(
    conn: Conn,
    capability: Capability,
    clock: Callable[[], float],
    offline_after_s: float,
) -> tuple[WorkerRecord, str]:
    """Register with the shared join token: always a new, policy-less ``open:`` host."""
    claimed = capability.host.removeprefix(OPEN_HOST_PREFIX)
    host = f"{OPEN_HOST_PREFIX}{claimed}"
    return register_worker(
        conn, capability.model_copy(update={"host": host}), clock, offline_after_s
    )
