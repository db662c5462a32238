"""The worker registry of the SQLite queue: register, authenticate, deregister, liveness.

A worker registers with its probed capability and gets a random bearer token; only the
token's hash is stored. Every claim or heartbeat *touches* the worker (``last_seen``), and
``candidates`` turns the online workers into what the scheduler compares a claimant with:
effective capability under its host's policy, and whether it is idle right now. Host
enrollment and revocation live beside it in ``sqlite_hosts``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from trainfleet.capability.model import Capability
from trainfleet.capability.policy import effective_capability
from trainfleet.errors import NotFound, Unauthorized
from trainfleet.manifest.spec import HostPolicy
from trainfleet.queue.base import WorkerRecord
from trainfleet.queue.db import Conn, Row
from trainfleet.queue.scheduling import Candidate
from trainfleet.queue.sqlite_schema import read_hosts, token_hash, worker_record


def register_worker(
    conn: Conn,
    capability: Capability,
    clock: Callable[[], float],
    offline_after_s: float,
) -> tuple[WorkerRecord, str]:
    """Insert a new online worker; returns its record and its bearer token."""
    token = secrets.token_urlsafe(32)
    worker_id = new_worker_id(conn, capability.host)
    now = clock()
    conn.execute(
        "INSERT INTO workers (id, host, capability, token_hash, state, registered_at,"
        " last_seen) VALUES (?, ?, ?, ?, 'online', ?, ?)",
        (
            worker_id,
            capability.host,
            capability.model_dump_json(),
            token_hash(token),
            now,
            now,
        ),
    )
    row = conn.execute("SELECT * FROM workers WHERE id = ?", (worker_id,)).fetchone()
    return worker_record(row, read_hosts(conn), clock, offline_after_s), token


def new_worker_id(conn: Conn, host: str) -> str:
    """``HOST-xxxxxx``, not taken by any worker, past or present. The suffix is short for
    people to read, so it can repeat: many workers giving one name in open mode would
    otherwise hit an existing id (an integrity error, not a takeover, but a 500)."""
    while True:
        worker_id = f"{host}-{secrets.token_hex(3)}"
        if conn.execute("SELECT 1 FROM workers WHERE id = ?", (worker_id,)).fetchone() is None:
            return worker_id


def authenticate_worker(conn: Conn, token: str) -> str:
    """The id of the worker holding ``token``; ``Unauthorized`` if none or deregistered."""
    row = conn.execute(
        "SELECT id, state FROM workers WHERE token_hash = ?", (token_hash(token),)
    ).fetchone()
    if row is None:
        raise Unauthorized("unknown worker credential; register again")
    if row["state"] == "stopped":
        raise Unauthorized(f"worker {row['id']} has deregistered; register again")
    if row["state"] == "revoked":
        raise Unauthorized(f"worker {row['id']}'s credential was revoked by the operator")
    return str(row["id"])


def deregister_worker(conn: Conn, worker_id: str, now: float) -> None:
    conn.execute(
        "UPDATE workers SET state = 'stopped', last_seen = ? WHERE id = ? AND state != 'revoked'",
        (now, worker_id),
    )


def touch(conn: Conn, worker_id: str, now: float) -> Row:
    """Mark the worker seen (and online) now; returns its row.

    A revoked or deregistered worker stays so: a request authenticated just before the
    revoke or deregistration committed (or through another coordinator's credential cache)
    is refused here, inside the write lock, rather than claiming work or coming back online.
    """
    row = conn.execute(
        "UPDATE workers SET last_seen = ?, state = 'online'"
        " WHERE id = ? AND state NOT IN ('revoked', 'stopped') RETURNING *",
        (now, worker_id),
    ).fetchone()
    if row is not None:  # nearly always: one statement
        return row
    row = conn.execute("SELECT * FROM workers WHERE id = ?", (worker_id,)).fetchone()
    if row is None:
        raise NotFound(f"no worker {worker_id!r}")
    if row["state"] == "revoked":
        raise Unauthorized(f"worker {worker_id}'s credential was revoked by the operator")
    if row["state"] == "stopped":
        raise Unauthorized(f"worker {worker_id} has deregistered; register again")
    return row


def candidates(
    conn: Conn,
    hosts: dict[str, HostPolicy],
    now: float,
    idle_window_s: float,
    offline_after_s: float,
) -> list[Candidate]:
    """Every worker online now (seen within ``offline_after_s``), as the scheduler sees it."""
    out = []
    rows = conn.execute(
        "SELECT * FROM workers WHERE state = 'online' AND last_seen >= ? ORDER BY registered_at",
        (now - offline_after_s,),
    )
    for row in rows:
        policy = hosts.get(row["host"])
        cap, _ = effective_capability(Capability.model_validate_json(row["capability"]), policy)
        idle = row["current_job"] is None and now - row["last_seen"] <= idle_window_s
        out.append(Candidate(row["id"], cap, policy, idle, row["current_job"]))
    return out


def release_worker(conn: Conn, worker_id: str | None, job_id: str) -> None:
    """Free ``worker_id``'s slot if it is still held by ``job_id``."""
    if worker_id:
        conn.execute(
            "UPDATE workers SET current_job = NULL WHERE id = ? AND current_job = ?",
            (worker_id, job_id),
        )


def set_slots(conn: Conn, worker_id: str, slots: int) -> None:
    """How many active jobs ``worker_id`` may hold at once (``claims``): set once, right
    after it registers; the worker daemon keeps the default of 1."""
    sql = "UPDATE workers SET slots = ? WHERE id = ? RETURNING id"
    if conn.execute(sql, (slots, worker_id)).fetchone() is None:
        raise NotFound(f"no worker {worker_id!r}")
