"""Tell every coordinator of a PostgreSQL database that work may have become claimable.

Idle workers wait in long-poll claims (``coordinator.longpoll``). The coordinator that makes
work claimable wakes its own waiters in memory, but with several coordinators on one
database the waiters of the others must hear of it too. So each transaction that makes work
claimable (a reload, a requeue, a reaped or retried attempt, a new round) calls
:func:`notify_work`: on PostgreSQL a ``NOTIFY`` on :data:`WORK_CHANNEL`, which the server
delivers to every listening coordinator when, and only if, the transaction commits (several
in one transaction arrive as one). Each coordinator listens (``coordinator.notify``) and wakes
its waiting claims. On SQLite one process serves the database: nothing to tell.

Channels belong to the whole database, schemas do not: the payload is the writer's schema,
and a listener heeds only its own, so two trainfleet schemas in one database (two fleets,
or tests side by side) do not wake each other.

A notification is a hint, never the truth: a woken claim simply claims again, and a waiting
claim re-checks every few seconds anyway, so a lost notification costs latency, not work.
"""

from __future__ import annotations

from trainfleet.queue.db import Conn, Dialect

WORK_CHANNEL = "trainfleet_work"


def notify_work(conn: Conn) -> None:
    """Inside a write transaction: tell every coordinator, at commit, that work may be
    claimable. A no-op on SQLite."""
    if conn.dialect == Dialect.POSTGRES:
        conn.execute("SELECT pg_notify(?, current_schema())", (WORK_CHANNEL,))
