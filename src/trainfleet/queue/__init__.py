"""The durable job queue: one interface (``JobQueue``), a SQLite backend here.

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
    """Open a queue by URL: ``sqlite:///path/to.db`` (or a plain path ending in .db)."""
    from trainfleet.errors import BadRequest
    from trainfleet.queue.sqlite import SQLiteQueue

    if url.startswith("sqlite:///"):
        return SQLiteQueue(url.removeprefix("sqlite:///"), settings=settings)
    if url.endswith(".db") and "://" not in url:
        return SQLiteQueue(url, settings=settings)
    raise BadRequest(f"unsupported queue URL {url!r} (expected sqlite:///PATH)")
