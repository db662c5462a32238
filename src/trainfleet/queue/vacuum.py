"""Vacuum for ``jobs`` on PostgreSQL when autovacuum will not (issue 9).

Every claim, completion and heartbeat rewrites a ``jobs`` row, and a fair-share level change
rewrites every pending row of a submitter. Each old version keeps its entry in the claim
index (``jobs_pending_claim``) until the table is vacuumed, and a claim reads the index from
its front, where the entries of the rows already claimed are: measured here with
``autovacuum = off`` at 100,000 jobs, a claim's page read 2,000 index pages (32-180 ms)
instead of a few (0.2 ms). The per-table autovacuum settings of migration 2 clean that up
within autovacuum's nap time, but only where autovacuum runs on ``jobs``: not where the
server's ``autovacuum`` is off, nor where the table's ``autovacuum_enabled`` reloption is
false. There the leader runs ``VACUUM (ANALYZE) jobs`` itself once the dead rows pass
``MIN_DEAD`` plus ``DEAD_FRACTION`` of the live ones (checked every ``CHECK_S`` from the
table's statistics).

VACUUM cannot remove a row that an open transaction may still see (one older than the rows'
deletion holds back the "xmin horizon"), and then the statistics count as many dead rows
after it as before. So the leader reads the statistics again right after each vacuum (VACUUM
writes ``n_dead_tup`` before it returns) and vacuums again only once the dead rows have grown
past what the last one left by the same threshold; the first vacuum of such a run warns and
names the oldest transaction. Dead rows that other sessions counted before the vacuum but had
not reported yet (a backend reports within seconds) are added after it, and bring the next
vacuum forward by as many.

VACUUM takes no lock that stops reads or writes, but it waits for its own lock while another
session holds a conflicting one (another VACUUM or ANALYZE, an index build, most ``ALTER
TABLE``, a ``LOCK TABLE``); it gives up after ``LOCK_TIMEOUT_S`` and the next check retries.
It runs on a connection of its own, off the coordinator's queue threads. SQLite updates rows
in place: nothing to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from trainfleet.queue.db import Conn, Database, PgConn, PostgresDatabase, Row

log = logging.getLogger(__name__)

CHECK_S = 10.0  # how often the leader reads the table's statistics
MIN_DEAD = 1_000  # dead rows always tolerated
DEAD_FRACTION = 0.05  # and this fraction of the live ones
LOCK_TIMEOUT_S = 5.0  # how long VACUUM waits for its lock on jobs before the next check retries

_STATS = (
    "SELECT current_setting('autovacuum') = 'on',"
    " coalesce((SELECT o.option_value::bool FROM pg_options_to_table(c.reloptions) o"
    " WHERE o.option_name = 'autovacuum_enabled'), true),"
    " s.n_dead_tup, s.n_live_tup"
    " FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid"
    " WHERE s.relid = 'jobs'::regclass"
)
# The session of this database whose transaction id or snapshot is the oldest: the likely
# reason a vacuum left its dead rows.
_OLDEST = (
    "SELECT pid, state, now() - xact_start FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND greatest(age(backend_xid), age(backend_xmin)) IS NOT NULL"
    " ORDER BY greatest(age(backend_xid), age(backend_xmin)) DESC LIMIT 1"
)


@dataclass(frozen=True)
class JobsStats:
    """What the statistics say of ``jobs``."""

    server_autovacuum: bool  # the server's ``autovacuum`` setting
    table_autovacuum: bool  # the table's ``autovacuum_enabled`` reloption (true unless set)
    dead: int  # n_dead_tup
    live: int  # n_live_tup

    @property
    def autovacuum(self) -> bool:
        """Whether autovacuum cleans ``jobs``: only where neither turned it off."""
        return self.server_autovacuum and self.table_autovacuum


def read_stats(conn: Conn) -> JobsStats:
    """The statistics of the ``jobs`` on ``conn``'s search path."""
    row = conn.execute(_STATS).fetchone()
    assert row is not None  # every table has its row in pg_stat_user_tables
    return JobsStats(bool(row[0]), bool(row[1]), int(row[2]), int(row[3]))


@dataclass(frozen=True)
class Vacuumed:
    dead: int  # dead rows the statistics counted before it
    live: int
    left: int  # and right after it: the ones it could not remove


def needs_vacuum(autovacuum: bool, dead: int, live: int, left: int = 0) -> bool:
    """Whether the leader vacuums ``jobs`` now: only where autovacuum does not, and only past
    ``MIN_DEAD + DEAD_FRACTION * live`` dead rows more than the last vacuum ``left``."""
    return not autovacuum and dead > left + MIN_DEAD + DEAD_FRACTION * live


class Vacuum:
    """The leader's vacuum of one database's ``jobs``, and what the last one left."""

    def __init__(self) -> None:
        self.left = 0  # dead rows the last vacuum could not remove
        self.held_back = False  # the last vacuum removed little (and said so)

    def run_if_bloated(self, db: Database) -> Vacuumed | None:
        """``VACUUM (ANALYZE) jobs`` when ``needs_vacuum`` says so (PostgreSQL only); what it
        found, or None when nothing was done."""
        if not isinstance(db, PostgresDatabase):  # SQLite updates rows in place
            return None
        with db.read() as conn:
            before = read_stats(conn)
        # Fewer than the last vacuum left: another VACUUM ran since, or the statistics were reset.
        self.left = min(self.left, before.dead)
        if not needs_vacuum(before.autovacuum, before.dead, before.live, self.left):
            return None
        from psycopg.errors import LockNotAvailable

        with db.connect() as raw:  # autocommit: VACUUM cannot run inside a transaction
            conn = PgConn(raw)
            conn.execute(f"SET lock_timeout = '{round(LOCK_TIMEOUT_S * 1000)}ms'")
            try:
                conn.execute("VACUUM (ANALYZE) jobs")
            except LockNotAvailable:
                log.warning(
                    "VACUUM of jobs gave up after %.1f s waiting for its lock (another session"
                    " holds a conflicting one: a VACUUM, an index build, an ALTER TABLE, a LOCK"
                    " TABLE); retrying in %.0f s",
                    LOCK_TIMEOUT_S,
                    CHECK_S,
                )
                return None
            after = read_stats(conn)
            removed_little = needs_vacuum(False, after.dead, after.live)
            oldest = conn.execute(_OLDEST).fetchone() if removed_little else None
        found = Vacuumed(dead=before.dead, live=before.live, left=after.dead)
        self.left = found.left
        if removed_little and not self.held_back:
            log.warning(
                "VACUUM of jobs left %d of %d dead rows: an old transaction still sees them"
                " (the oldest in this database: %s); vacuuming again once %d more are dead",
                found.left,
                found.dead,
                _describe(oldest),
                MIN_DEAD + round(DEAD_FRACTION * after.live),
            )
        else:
            log.info(
                "vacuumed jobs (%d dead rows, %d left, %d live; autovacuum is off for it)",
                found.dead,
                found.left,
                found.live,
            )
        self.held_back = removed_little
        return found


def _describe(oldest: Row | None) -> str:
    """``pid 4711 (idle in transaction, 0:12:31)`` from a row of ``_OLDEST``; state and age
    are hidden from a role without ``pg_read_all_stats`` for other roles' sessions."""
    if oldest is None:
        return (
            "none open now; else a prepared transaction, a replication slot, or a role that"
            " does not own jobs"
        )
    seen = [str(value) for value in (oldest[1], oldest[2]) if value is not None]
    return f"pid {oldest[0]}" + (f" ({', '.join(seen)})" if seen else "")
