"""Attestation state in the queue: the nonces the coordinator issues and the workers it
trusts with private work (``verify.attest`` checks the quotes; this module keeps the facts).

A nonce is 32 random bytes (hex), bound to the worker that asked for it, usable once within
its TTL. Issuing one replaces that worker's earlier unused nonces (a worker attests one at a
time), and nonces long expired are purged, so a worker asking again and again cannot grow the
table. Used nonces stay until purged: a replayed quote is then refused as a replay, later
as an unknown nonce; never accepted.

``attest_worker`` consumes the nonce (re-checked inside the transaction, so two concurrent
replays cannot both pass) and marks the worker attested until a time: ``claims`` hands a
``tier = 'private'`` job only to a worker with ``attested_until > now``. The attestation ends
with the worker's credential: a revoked or deregistered worker can no longer claim, and a
worker that registers again has a new id, unattested.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence

from trainfleet.errors import NotFound, Unauthorized
from trainfleet.queue.db import Conn
from trainfleet.verify.attest import AttestationRefused

PURGE_AFTER_S = 3600.0  # nonces expired this long ago are deleted


def issue_nonce(conn: Conn, worker_id: str, now: float, ttl_s: float) -> str:
    """A fresh nonce for ``worker_id``, valid ``ttl_s`` from ``now``."""
    if conn.execute("SELECT 1 FROM workers WHERE id = ?", (worker_id,)).fetchone() is None:
        raise NotFound(f"no worker {worker_id!r}")
    conn.execute("DELETE FROM attest_nonces WHERE expires_at < ?", (now - PURGE_AFTER_S,))
    conn.execute("DELETE FROM attest_nonces WHERE worker_id = ? AND used_at IS NULL", (worker_id,))
    nonce = secrets.token_hex(32)
    conn.execute(
        "INSERT INTO attest_nonces (nonce, worker_id, issued_at, expires_at) VALUES (?, ?, ?, ?)",
        (nonce, worker_id, now, now + ttl_s),
    )
    return nonce


def check_nonce(conn: Conn, worker_id: str, nonce: str, now: float) -> None:
    """Refuse (``AttestationRefused``) unless ``nonce`` was issued to ``worker_id``, has not
    expired and was never used."""
    row = conn.execute(
        "SELECT worker_id, expires_at, used_at FROM attest_nonces WHERE nonce = ?", (nonce,)
    ).fetchone()
    if row is None:
        raise AttestationRefused(
            "nonce_unknown", "the quote's nonce was not issued by this coordinator (or purged)"
        )
    if not hmac.compare_digest(str(row["worker_id"]).encode(), worker_id.encode()):
        raise AttestationRefused(
            "nonce_other_worker", "the quote's nonce was issued to another worker"
        )
    if row["expires_at"] <= now:
        raise AttestationRefused(
            "nonce_expired", "the quote's nonce has expired; ask for a new one"
        )
    if row["used_at"] is not None:
        raise AttestationRefused(
            "replay", "the quote's nonce was already used: a replayed quote is refused"
        )


def attest_worker(
    conn: Conn, worker_id: str, nonce: str, measurement: str, until: float, now: float
) -> None:
    """Consume ``nonce`` and mark ``worker_id`` attested (``measurement``) until ``until``."""
    check_nonce(conn, worker_id, nonce, now)
    used = conn.execute(
        "UPDATE attest_nonces SET used_at = ? WHERE nonce = ? AND used_at IS NULL RETURNING nonce",
        (now, nonce),
    ).fetchone()
    if used is None:  # check_nonce ran in this transaction: only a bug gets here
        raise AttestationRefused("replay", "the quote's nonce was already used")
    row = conn.execute(
        "UPDATE workers SET attested_until = ?, measurement = ?"
        " WHERE id = ? AND state NOT IN ('revoked', 'stopped') RETURNING id",
        (until, measurement, worker_id),
    ).fetchone()
    if row is None:
        raise Unauthorized(f"worker {worker_id} is revoked or deregistered; register again")


def end_attestations_except(conn: Conn, measurements: Sequence[str]) -> int:
    """End every attestation whose measurement is not in ``measurements`` (the allowlist a
    coordinator starts with): a build the operator dropped stops claiming private work now,
    not when its attestation would have expired. The number of workers it ended."""
    sql = "UPDATE workers SET attested_until = NULL WHERE attested_until IS NOT NULL"
    params: list[str] = list(measurements)
    if params:
        marks = ", ".join("?" for _ in params)
        sql += f" AND (measurement IS NULL OR measurement NOT IN ({marks}))"
    return len(conn.execute(sql + " RETURNING id", params).fetchall())
