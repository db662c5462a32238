"""Which coordinator runs the singletons: the reaper, the lease renewal and the round ticker.

Any number of coordinators may serve one PostgreSQL database. Most of what they do is a
request's own transaction, safe side by side. Three loops are not requests: the reaper (which
requeues lost attempts), the renewal of every active lease when a coordinator takes over, and
the round driver's ticker. Each of their steps is still a transaction that re-checks its
precondition, so two coordinators running them at once would not corrupt anything, but they
would do every step twice over and race for the same rows. So exactly one coordinator at a
time, the leader, runs them.

- SQLite: one process serves the database; it is always the leader (:class:`SoleLeader`).
- PostgreSQL (:class:`AdvisoryLeader`): the leader is the coordinator whose dedicated
  connection holds the session advisory lock ``pg_try_advisory_lock(key)``. Every coordinator
  tries to take it every ``retry_s`` (1 s). The lock lives exactly as long as the connection:
  a leader that dies (even by SIGKILL) or loses its connection frees it at once, and another
  takes it within ``retry_s``. A leader checks its connection every ``retry_s``; when the check
  fails it stops leading before it reconnects.

Both count ``term``: it goes up each time leadership is taken, and ``take_new_term()`` is
True once per term, so every active lease is renewed once per new term (at the start, or by
the reaper when leadership comes later). A new leader cannot know which beats its predecessor had
absorbed but not yet flushed (``coordinator.beats``), nor how long no reaper ran: renewal
gives every active attempt one full lease from now, and fencing keeps a written-off
worker's late writes out whatever happens.

The key: ``db.LEADER_KEY`` with its low 32 bits taken from the connection's schema, because
advisory locks are per database, not per schema: coordinators of two trainfleet schemas in
one database (tests, or two fleets) must not share a leader.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from trainfleet.queue.db import schema_key

log = logging.getLogger(__name__)

RETRY_S = 1.0  # how often a follower tries to take the lock, and a leader checks it still can
CONNECT_TIMEOUT_S = 5
# A leader whose database vanished (a partition, not a closed socket) must find out within a
# few seconds, not after the kernel's default two hours of TCP keepalive.
KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 10_000,  # ms
}
SERVER_KEEPALIVE = {
    "tcp_keepalives_idle": 5,
    "tcp_keepalives_interval": 2,
    "tcp_keepalives_count": 2,
}


class Leadership(Protocol):
    """What the coordinator's loops ask: lead now? and in which term?"""

    @property
    def is_leader(self) -> bool: ...
    @property
    def term(self) -> int: ...
    def take_new_term(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


class SoleLeader:
    """One coordinator per database (SQLite): the leader from start to end, in term 1."""

    is_leader = True
    term = 1

    def __init__(self) -> None:
        self._taken = False

    def take_new_term(self) -> bool:
        """True the first time only: the start is the one new term."""
        new, self._taken = not self._taken, True
        return new

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class AdvisoryLeader:
    """Leadership by a PostgreSQL session advisory lock held on a dedicated connection, with
    a thread that takes it (follower) or checks it (leader) every ``retry_s``.

    ``connect()`` opens that connection (autocommit); ``base_key`` is the lock key before its
    schema is folded in (:func:`schema_key`)."""

    def __init__(
        self,
        connect: Callable[[], Any],
        base_key: int,
        *,
        retry_s: float = RETRY_S,
        name: str = "coordinator",
    ) -> None:
        self._connect = connect
        self._base_key = base_key
        self.retry_s = retry_s
        self.name = name
        self._conn: Any = None
        self._key: int | None = None
        self._leader = False
        self._term = 0
        self._taken_term = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def term(self) -> int:
        return self._term

    def take_new_term(self) -> bool:
        """True once per term, while leading: whoever asks first (the start, else the
        reaper) renews every active lease for it."""
        term = self._term
        if not self._leader or term == self._taken_term:
            return False
        self._taken_term = term
        return True

    @property
    def key(self) -> int | None:
        """The lock key, once a connection told this coordinator its schema."""
        return self._key

    def start(self) -> None:
        """Try once now (so a coordinator alone on its database leads from its first reaper
        pass), then every ``retry_s`` on a thread."""
        self.step()
        self._thread = threading.Thread(target=self._run, name="trainfleet-leader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop trying; close the connection, which frees the lock for another coordinator."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * self.retry_s + CONNECT_TIMEOUT_S)
        self._drop()

    def _run(self) -> None:
        while not self._stop.wait(self.retry_s):
            self.step()

    def step(self) -> bool:
        """One attempt: (re)connect if needed, then take the lock (follower) or prove the
        connection still lives (leader). Whether this coordinator leads now."""
        try:
            if self._conn is None:
                self._conn = self._connect()
                schema = self._conn.execute("SELECT current_schema()").fetchone()[0]
                self._key = schema_key(self._base_key, str(schema))
            if self._leader:
                self._conn.execute("SELECT 1").fetchone()
            elif self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()[0]:
                self._term += 1
                self._leader = True
                log.info("%s leads now (term %d)", self.name, self._term)
        except Exception as err:  # psycopg.Error or OSError: the connection is gone
            if self._leader:
                log.warning("%s lost leadership: %s", self.name, _first_line(err))
            else:
                log.debug("leader lock: %s", _first_line(err))
            self._drop()
        return self._leader

    def _drop(self) -> None:
        self._leader = False
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken connection may raise; it is closed anyway
                log.debug("closing the leader connection", exc_info=True)


def leadership_for(queue: object, *, name: str = "coordinator") -> Leadership:
    """An :class:`AdvisoryLeader` on the queue's PostgreSQL database; a :class:`SoleLeader`
    for any other queue."""
    db = getattr(queue, "db", None)
    if db is None or str(getattr(db, "dialect", "")) != "postgres":
        return SoleLeader()
    from trainfleet.queue.db import LEADER_KEY

    url = str(db.url)
    return AdvisoryLeader(lambda: dedicated_connection(url), LEADER_KEY, name=name)


def dedicated_connection(url: str) -> Any:
    """A PostgreSQL connection of its own (autocommit) for a session that lives long (the
    leader lock, LISTEN), with keepalives on both ends: a coordinator or a database that
    vanishes without closing the socket is noticed within seconds, not hours."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    conn = psycopg.connect(
        make_conninfo(url, connect_timeout=CONNECT_TIMEOUT_S, **KEEPALIVE), autocommit=True
    )
    for setting, value in SERVER_KEEPALIVE.items():
        conn.execute(f"SET {setting} = {value}")
    return conn


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
