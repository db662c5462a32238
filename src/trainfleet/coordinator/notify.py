"""PostgreSQL LISTEN bridged to the long-poll claims of this coordinator.

Another coordinator of the same database that makes work claimable commits a ``NOTIFY`` on
``trainfleet_work`` (``queue.notify``). :class:`WorkListener` holds a dedicated connection
that LISTENs on that channel, on a thread of its own, and calls ``on_work`` (the coordinator's
``WorkSignal.notify``, safe from any thread) for each notification from its own schema (the
payload), so this coordinator's idle workers claim at once instead of at their next re-check.

A dropped connection is re-opened every ``retry_s``; while it is down notifications are lost,
so the listener calls ``on_work`` once after each (re)connection: whatever happened meanwhile,
waiting claims look again. On SQLite there is nothing to listen to (one process serves the
database and wakes its own waiters): :func:`listen_for_work` returns None.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from trainfleet.coordinator.leader import dedicated_connection
from trainfleet.queue.notify import WORK_CHANNEL

log = logging.getLogger(__name__)

RETRY_S = 1.0  # between attempts to re-open a lost connection
POLL_S = 1.0  # how often the listening thread looks up to see whether it should stop


class WorkListener:
    """LISTEN on ``trainfleet_work`` on a connection from ``connect()``; ``on_work()`` per
    notification and after each (re)connection."""

    def __init__(
        self,
        connect: Callable[[], Any],
        on_work: Callable[[], None],
        *,
        retry_s: float = RETRY_S,
        poll_s: float = POLL_S,
    ) -> None:
        self._connect = connect
        self._on_work = on_work
        self.retry_s = retry_s
        self.poll_s = poll_s
        self.notifications = 0  # received so far
        self.connections = 0  # connections that reached LISTEN so far
        self.backend_pid: int | None = None  # the server process of the live connection
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trainfleet-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + self.retry_s + 10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as err:  # psycopg.Error or OSError: the connection is gone
                self.backend_pid = None
                log.warning("LISTEN %s: %s; reconnecting", WORK_CHANNEL, _first_line(err))
                self._stop.wait(self.retry_s)

    def _listen(self) -> None:
        conn = self._connect()
        try:
            schema = str(conn.execute("SELECT current_schema()").fetchone()[0])
            conn.execute(f"LISTEN {WORK_CHANNEL}")
            self.backend_pid = int(conn.info.backend_pid)
            self.connections += 1
            self._on_work()  # anything made claimable while nobody listened
            while not self._stop.is_set():
                for note in conn.notifies(timeout=self.poll_s):
                    if note.payload == schema:  # another schema's fleet: not ours
                        self.notifications += 1
                        self._on_work()
        finally:
            try:
                conn.close()
            except Exception:  # a broken connection may fail to close; it is closed anyway
                log.debug("closing the LISTEN connection", exc_info=True)


def listen_for_work(queue: object, on_work: Callable[[], None]) -> WorkListener | None:
    """A started :class:`WorkListener` on the queue's PostgreSQL database; None for any
    other queue (nothing to listen to)."""
    db = getattr(queue, "db", None)
    if db is None or str(getattr(db, "dialect", "")) != "postgres":
        return None
    url = str(db.url)
    listener = WorkListener(lambda: dedicated_connection(url), on_work)
    listener.start()
    return listener


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
