"""The durable job queue: one interface (``JobQueue``), on SQLite or PostgreSQL.

Every unit of work is a row claimed atomically; every claim carries a fencing epoch that all
later writes must name; every transition is an event.
"""

from trainfleet.queue.base import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    ArtifactRecord,
    Claim,
    Event,
    HeartbeatReply,
    JobQueue,
    JobRecord,
    LogLine,
    PlanEntry,
    QueueSettings,
    ReloadPlan,
    WorkerRecord,
)

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "ArtifactRecord",
    "Claim",
    "Event",
    "HeartbeatReply",
    "JobQueue",
    "JobRecord",
    "LogLine",
    "PlanEntry",
    "QueueSettings",
    "ReloadPlan",
    "WorkerRecord",
    "open_queue",
]


def open_queue(url: str, settings: QueueSettings | None = None) -> JobQueue:
    """Open a queue by URL: ``sqlite:///path/to.db`` (or a plain path ending in .db), or
    ``postgresql://user@host:port/dbname`` (``postgres://`` too; libpq parameters such as
    ``?options=-c%20search_path%3Dname`` pass through)."""
    from trainfleet.errors import BadRequest
    from trainfleet.queue.sqlite import PostgresQueue, SQLiteQueue

    if url.startswith(("postgresql://", "postgres://")):
        return PostgresQueue(url, settings=settings)
    if url.startswith("sqlite:///"):
        return SQLiteQueue(url.removeprefix("sqlite:///"), settings=settings)
    if url.endswith(".db") and "://" not in url:
        return SQLiteQueue(url, settings=settings)
    raise BadRequest(f"unsupported queue URL {url!r} (expected sqlite:///PATH or postgresql://...)")
