"""Vacuum for ``jobs`` on PostgreSQL when the server's autovacuum will not (issue 9).

Every claim, completion and heartbeat rewrites a ``jobs`` row, and a fair-share level change
rewrites every pending row of a submitter. Each old version keeps its entry in the claim
index (``jobs_pending_claim``) until the table is vacuumed, and a claim reads the index from
its front, where the entries of the rows already claimed are: measured here with
``autovacuum = off`` at 100,000 jobs, a claim's page read 2,000 index pages (32-180 ms)
instead of a few (0.2 ms). The per-table autovacuum settings of migration 2 clean that up
within autovacuum's nap time, but only where autovacuum runs. Where it is off, the leader
runs ``VACUUM (ANALYZE) jobs`` itself once the dead rows pass ``MIN_DEAD`` plus
``DEAD_FRACTION`` of the live ones (checked every ``CHECK_S`` from the table's statistics).
VACUUM takes no lock that stops reads or writes; it runs on a connection of its own, off the
coordinator's queue threads. SQLite updates rows in place: nothing to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from trainfleet.queue.db import Database, PostgresDatabase

log = logging.getLogger(__name__)

CHECK_S = 10.0  # how often the leader reads the table's statistics
MIN_DEAD = 1_000  # dead rows always tolerated
DEAD_FRACTION = 0.05  # and this fraction of the live ones

_STATS = (
    "SELECT current_setting('autovacuum') = 'on' AS autovacuum, n_dead_tup, n_live_tup"
    " FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass"
)


@dataclass(frozen=True)
class Vacuumed:
    dead: int  # dead rows the statistics counted before it
    live: int


def needs_vacuum(autovacuum: bool, dead: int, live: int) -> bool:
    """Whether the leader vacuums ``jobs`` now: only where autovacuum is off, and only past
    ``MIN_DEAD + DEAD_FRACTION * live`` dead rows."""
    return not autovacuum and dead > MIN_DEAD + DEAD_FRACTION * live


def vacuum_jobs_if_bloated(db: Database) -> Vacuumed | None:
    """``VACUUM (ANALYZE) jobs`` when ``needs_vacuum`` says so (PostgreSQL only); what it
    found, or None when nothing was done."""
    if not isinstance(db, PostgresDatabase):  # SQLite updates rows in place
        return None
    with db.read() as conn:
        row = conn.execute(_STATS).fetchone()
    if row is None or not needs_vacuum(bool(row[0]), int(row[1]), int(row[2])):
        return None
    with db.connect() as conn:  # autocommit: VACUUM cannot run inside a transaction
        conn.execute("VACUUM (ANALYZE) jobs")
    found = Vacuumed(dead=int(row[1]), live=int(row[2]))
    log.info(
        "vacuumed jobs (%d dead rows, %d live; the server's autovacuum is off)",
        found.dead,
        found.live,
    )
    return found
