"""WAL checkpoints off the coordinator's writer thread (SQLite).

In WAL mode SQLite copies the log back into the database file ("checkpoints") from inside
whichever COMMIT pushes the log past 1,000 pages, and a checkpoint with ``synchronous=NORMAL``
fsyncs the log and the database file: tens of milliseconds on an ordinary disk, spent on the
coordinator's ONE writer thread (``coordinator/writer.py``), so every claim queued behind
that commit waits too (issue 9 measured a quarter of the queue's time per job in commits that
checkpointed, and the claim p99 with it).

``Checkpointer`` turns the automatic checkpoint off on the queue's connection and runs a
PASSIVE checkpoint every ``interval_s`` on a connection of its own, on its own thread: a
passive checkpoint never blocks the writer (it copies what no reader still needs and returns),
and sqlite3 releases the GIL while it copies and syncs. Durability is unchanged: a commit is
in the log either way, and the log is replayed on open after a crash. If the checkpointer
stops, the automatic checkpoint is turned back on.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

from trainfleet.queue.db import SQLiteDatabase

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.25
AUTO_PAGES = 1000  # SQLite's default wal_autocheckpoint, restored on stop


class Checkpointer:
    """A thread running ``PRAGMA wal_checkpoint(PASSIVE)`` every ``interval_s`` on the file
    of ``db``, whose own connection's automatic checkpoint it replaces."""

    def __init__(self, db: SQLiteDatabase, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.db = db
        self.interval_s = interval_s
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainfleet-checkpoint", daemon=True)

    def start(self) -> None:
        self._auto(0)
        self._thread.start()

    def _auto(self, pages: int) -> None:
        """Set the queue connection's automatic checkpoint (under its lock)."""
        try:
            with self.db.read() as conn:
                conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
        except sqlite3.ProgrammingError:
            pass  # the queue's connection is already closed

    def stop(self) -> None:
        """Stop the thread and give the queue's connection its automatic checkpoint back."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._auto(AUTO_PAGES)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.db.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=1000")
        except sqlite3.Error:
            log.exception("no background checkpoints: SQLite checkpoints in its commits")
            self._auto(AUTO_PAGES)
            return
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.passes += 1
                except sqlite3.Error as err:  # busy with another checkpoint: next time
                    log.debug("background checkpoint skipped: %s", err)
        finally:
            conn.close()


__all__ = ["Checkpointer"]
