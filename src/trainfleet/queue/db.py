"""The storage layer under the queue: one ``Database`` API over SQLite and PostgreSQL.

The queue's SQL is written once, in a subset both engines accept (``?`` placeholders,
``ON CONFLICT``, ``IS DISTINCT FROM``, booleans as 0/1, ids from ``RETURNING``), and runs on a
``Conn`` that hides the driver. What differs is how a write transaction gets its lock:

- SQLite: ONE connection guarded by a re-entrant lock; ``tx()`` is ``BEGIN IMMEDIATE``, which
  takes the file's single write lock, so every read-check-write in the queue is atomic. The
  coordinator runs every queue call on one thread (``single_writer``).
- PostgreSQL: a ``psycopg_pool`` pool; ``tx()`` first takes ``pg_advisory_xact_lock`` on the
  schema's write key (``schema_key``): the same guarantee as ``BEGIN IMMEDIATE``, across any
  number of coordinators on one database. ``tx(shared=True)`` takes the shared variant, for
  the claim, the batched heartbeat flush and a plain completion only: those run side by side
  (a claim picks rows with ``FOR UPDATE SKIP LOCKED``, a completion locks its job's row
  ``FOR UPDATE``), and no exclusive writer (cancel, requeue, reap, reload, a completion that
  checks shard hashes) interleaves. Shared writers lock rows, so two of them can deadlock
  (PostgreSQL then aborts one: ``lock_conflicts``); the caller runs that one again under
  the exclusive lock.

A transaction or read opened while the same thread is already inside one joins it (same
connection, no new BEGIN): a nested ``tx()`` on PostgreSQL would otherwise wait forever on
the advisory lock its own thread holds.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from trainfleet.errors import TrainfleetError

# Advisory lock keys (64-bit, ASCII "tf" + a tag): every trainfleet lock in one database.
WRITE_LOCK_KEY = 0x7466_5752_4954_4500  # "tfWRITE": the queue's write transactions
LEADER_KEY = 0x7466_4C45_4144_4500  # "tfLEAD": the coordinator that runs the reaper/ticker

Params = Sequence[Any] | Mapping[str, Any]


class DatabaseUnavailable(TrainfleetError):
    """The database cannot be reached (or refuses us) when the queue opens."""


class Dialect(StrEnum):
    SQLITE = "sqlite"
    POSTGRES = "postgres"


class Row(Protocol):
    """A result row: ``row["col"]`` and ``row[0]`` both work; ``dict(row)`` too."""

    def __getitem__(self, key: Any) -> Any: ...
    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """One connection inside a transaction (``tx``) or not (``read``)."""

    dialect: Dialect

    def execute(self, sql: str, params: Params = ()) -> Cursor: ...
    def executemany(self, sql: str, seq: Sequence[Params]) -> None: ...


class Deferred(Protocol):
    """Writes that the calls of one group transaction leave to be done together
    (``SQLiteDatabase.group``); ``write`` does them and forgets them."""

    def write(self, conn: Conn) -> None: ...


class Database(Protocol):
    dialect: Dialect
    single_writer: bool  # True: the coordinator runs every queue call on ONE thread
    url: str
    # What a shared transaction raises when the database aborted it for a lock conflict with
    # another shared one (a deadlock): run again under the exclusive lock, it cannot recur.
    lock_conflicts: tuple[type[BaseException], ...]

    # defer: a call that may leave writes to the group transaction it joins (``deferred``).
    def tx(self, *, shared: bool = False, defer: bool = False) -> AbstractContextManager[Conn]: ...
    def read(self) -> AbstractContextManager[Conn]: ...
    def deferred(self) -> Deferred | None: ...
    def close(self) -> None: ...


def open_database(url: str, *, pool_size: int = 10) -> Database:
    """``sqlite:///path``, a plain file path (or ``:memory:``), or ``postgresql://...``
    (``postgres://`` too; libpq query parameters such as ``options`` pass through)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url, pool_size=pool_size)
    if url.startswith("sqlite:///"):
        return SQLiteDatabase(url.removeprefix("sqlite:///"))
    if "://" in url:
        raise ValueError(f"unsupported database URL {redact(url)!r}")
    return SQLiteDatabase(url)


# SQLite ---------------------------------------------------------------------------------
class SQLiteConn:
    """The SQLite connection itself speaks the neutral SQL; this only adds ``dialect``."""

    dialect = Dialect.SQLITE

    def __init__(self, raw: sqlite3.Connection):
        self.raw = raw
        # The connection's own method: no Python frame between a statement and SQLite (the
        # writer runs about a dozen statements a cycle; issue 9).
        self.execute = raw.execute  # type: ignore[method-assign,assignment]

    def execute(self, sql: str, params: Params = ()) -> Cursor:
        return self.raw.execute(sql, params)

    def executemany(self, sql: str, seq: Sequence[Params]) -> None:
        self.raw.executemany(sql, seq)


def sqlite_connect(path: str) -> sqlite3.Connection:
    """Autocommit mode (transactions are explicit), rows by name and by index, WAL.

    ``temp_store=MEMORY`` keeps SQLite's temporary files in memory, the statement journal
    among them: SQLite copies every page a SAVEPOINT (a batch's, a retried group commit's
    call: ``coordinator.group_commit``) first changes into that journal, which spills to a
    temporary file past 64 KiB. Measured with
    ``bench.queue_inproc`` (issue 9): the writer thread made 89 write calls and wrote 189 KB
    per unbatched cycle, 74 of them and 157 KB to that file; in memory, 15 calls and 31 KB (the
    write-ahead log), and 10-20% less CPU per cycle."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


class SQLiteDatabase:
    """One connection behind an RLock: SQLite has one writer anyway, and one connection
    makes ``:memory:`` work and lets a read see the transaction its thread has open."""

    dialect = Dialect.SQLITE
    single_writer = True
    lock_conflicts: tuple[type[BaseException], ...] = ()  # every transaction is exclusive

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.url = self.path
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._depth = 0  # how deep the lock's holder has taken it (only the holder counts)
        self._on_free: Callable[[], None] | None = None  # ``try_hold``'s waiter
        self._waiter = threading.Lock()  # guards ``_on_free``
        self.raw = sqlite_connect(self.path)
        self._conn = SQLiteConn(self.raw)
        self._deferred: Deferred | None = None  # the open group's (``group``)

    @contextmanager
    def _held(self) -> Iterator[None]:
        """The connection's lock, let go by ``release`` (which calls the waiter ``try_hold``
        left), a transaction that raised included."""
        self._lock.acquire()
        self._depth += 1
        try:
            yield
        finally:
            self.release()

    def _freed(self) -> None:
        if self._on_free is None:  # the common case, read without the guard
            return
        with self._waiter:
            on_free, self._on_free = self._on_free, None
        if on_free is not None:
            on_free()

    @contextmanager
    def tx(self, *, shared: bool = False, defer: bool = False) -> Iterator[Conn]:
        with self._held():
            if self.raw.in_transaction:  # nested on this thread: join the open transaction
                if not defer:
                    self.settle()
                yield self._conn
                return
            self.raw.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self.raw.execute("ROLLBACK")
                raise
            self.raw.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Conn]:
        with self._held():
            self.settle()
            yield self._conn

    @contextmanager
    def group(self, deferred: Deferred) -> Iterator[Conn]:
        """One transaction for the calls of a group commit (``coordinator.group_commit``), in
        which a call that joins with ``tx(defer=True)`` may leave writes to ``deferred``
        (``deferred()``): several calls' events in one INSERT, their fair-share charges in
        one per submitter. Those writes are done before any other call joins the
        transaction or reads in it, so no call reads a state they would change; the group
        does them last with ``settle``, before it commits. The lock is held throughout:
        another thread's read waits for the commit, as for any transaction."""
        with self.tx() as conn:
            self._deferred = deferred
            try:
                yield conn
            finally:
                self._deferred = None

    def deferred(self) -> Deferred | None:
        """The open group's deferred writes, for a call inside ``tx(defer=True)`` (None: no
        group is open; write at once)."""
        return self._deferred

    def try_hold(self, on_free: Callable[[], None] | None = None) -> bool:
        """Take the connection's lock if no other thread holds it (the event loop's group
        commits: ``group_commit.GroupWriter.call_inline``); the caller ``release``s it.

        ``on_free``: where the lock is held, called (on the holder's thread, once) when its
        holder lets it go, so that the caller need not keep looking. One waiter at a time: a
        later ``on_free`` replaces an earlier one. It may be called once the lock is taken
        again by then, or after this call took it after all: the caller looks again."""
        if self._lock.acquire(blocking=False):
            self._depth += 1
            return True
        if on_free is None:
            return False
        with self._waiter:
            self._on_free = on_free
        if self._lock.acquire(blocking=False):  # let go before the waiter was seen
            with self._waiter:
                self._on_free = None
            self._depth += 1
            return True
        return False

    def release(self) -> None:
        self._depth -= 1
        last = self._depth == 0
        self._lock.release()
        if last:
            self._freed()

    def settle(self) -> None:
        """Do the open group's deferred writes now (nothing outside a group)."""
        if self._deferred is not None:
            self._deferred.write(self._conn)

    def close(self) -> None:
        with self._lock:
            self.raw.close()


# PostgreSQL -----------------------------------------------------------------------------
_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?|%|(?<!:):([A-Za-z_]\w*)")


@lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """Neutral SQL -> psycopg's: ``?`` -> ``%s``, ``:name`` -> ``%(name)s``, every literal
    ``%`` doubled (inside quotes too); ``?`` or ``:x`` inside quotes, and ``::`` casts, stay."""

    def sub(m: re.Match[str]) -> str:
        tok = m.group(0)
        if tok == "?":
            return "%s"
        if tok == "%":
            return "%%"
        if m.group(1):
            return f"%({m.group(1)})s"
        return tok.replace("%", "%%")  # psycopg reads % even inside quotes

    return _TOKEN.sub(sub, sql)


def _adapt(params: Params) -> Params:
    """Booleans become 0/1 (the columns are integers on both engines)."""
    if isinstance(params, Mapping):
        return {k: int(v) if isinstance(v, bool) else v for k, v in params.items()}
    return [int(v) if isinstance(v, bool) else v for v in params]


class PgRow:
    """A psycopg row readable like ``sqlite3.Row``: by name, by index, ``dict(row)``."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: Sequence[Any]):
        self._index = index
        self._values = values

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._index)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"PgRow({dict(zip(self._index, self._values, strict=True))!r})"


_QUERY_PASSWORD = re.compile(r"([?&](?:password|sslpassword)=)[^&#]*", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` without its passwords, for messages: the one in the user info (up to the
    authority's last '@', as libpq reads it) and any ``password=`` query parameter (libpq
    takes one there too). Never raises, whatever the text (a malformed URL is printed in
    error messages too)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _QUERY_PASSWORD.sub(r"\1***", url)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        if ":" in userinfo:
            authority = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return f"{scheme}://{authority}" + _QUERY_PASSWORD.sub(r"\1***", tail)


@lru_cache(maxsize=1024)
def _row_index(names: tuple[bytes | None, ...]) -> dict[str, int]:
    """Column name -> position, for one shape of result (the last of a repeated name, as a
    dict built from ``cursor.description`` would have it)."""
    return {(name or b"").decode(): i for i, name in enumerate(names)}


def pg_row_factory(cursor: Any) -> Any:
    """Rows readable by name, the names read from the result itself: ``cursor.description``
    builds a ``Column`` object per column (type lookups and all) on every query, which was
    30-40 µs per ``SELECT *`` of ``jobs`` (about 40 columns), a fifth of the coordinator's
    CPU per claim cycle on PostgreSQL. One shape's index is built once (``_row_index``)."""
    result = cursor.pgresult
    if result is None:
        names: tuple[bytes | None, ...] = ()
    else:
        names = tuple(result.fname(i) for i in range(result.nfields))
    index = _row_index(names)

    def make(values: Sequence[Any]) -> PgRow:
        return PgRow(index, values)

    return make


class PgConn:
    dialect = Dialect.POSTGRES

    def __init__(self, raw: Any):
        self.raw = raw  # a psycopg.Connection

    def execute(self, sql: str, params: Params = ()) -> Cursor:
        if not params:
            return self.raw.execute(sql)
        return self.raw.execute(to_pyformat(sql), _adapt(params))

    def executemany(self, sql: str, seq: Sequence[Params]) -> None:
        if seq:
            with self.raw.cursor() as cur:
                cur.executemany(to_pyformat(sql), [_adapt(p) for p in seq])


def schema_key(base: int, schema: str) -> int:
    """``base`` (a signed 64-bit advisory lock key) with its low 32 bits replaced by a hash
    of ``schema``. Advisory locks are per database, not per schema: this gives each trainfleet
    schema of one database its own locks (tests run in parallel schemas of one database)."""
    return (base & ~0xFFFF_FFFF) | zlib.crc32(schema.encode())


class PostgresDatabase:
    """A connection pool; write transactions serialized (or shared) by an advisory lock."""

    dialect = Dialect.POSTGRES
    single_writer = False
    lock_conflicts: tuple[type[BaseException], ...]  # psycopg's DeadlockDetected (set on open)

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout_s: float = 10.0):
        import psycopg
        from psycopg_pool import ConnectionPool

        self.url = url
        self.pool_size = pool_size
        self._psycopg = psycopg
        self.lock_conflicts = (psycopg.errors.DeadlockDetected,)
        self._local = threading.local()
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "row_factory": pg_row_factory},
            open=False,
            name="trainfleet",
        )
        try:
            self.pool.open(wait=True, timeout=connect_timeout_s)
        except Exception as err:
            self.pool.close()
            raise DatabaseUnavailable(
                f"cannot open the database {redact(url)}: {self._why(err)}"
            ) from None
        with self.pool.connection() as raw:
            row = raw.execute("SELECT current_schema()").fetchone()
        self.schema = str(row[0]) if row else "public"
        self.write_key = schema_key(WRITE_LOCK_KEY, self.schema)

    def _why(self, err: Exception) -> str:
        """The pool only says it timed out; one direct attempt says why."""
        try:
            self._psycopg.connect(self.url, connect_timeout=3).close()
        except Exception as direct:
            text = str(direct).strip()
            return " ".join(text.split()) or type(direct).__name__
        return str(err)

    def connect(self) -> Any:
        """A dedicated connection outside the pool (autocommit; rows like the pool's): for
        what holds a session for long, such as the leader lock or LISTEN."""
        return self._psycopg.connect(self.url, autocommit=True, row_factory=pg_row_factory)

    @contextmanager
    def _checkout(self) -> Iterator[tuple[PgConn, bool]]:
        """This thread's open connection if it has one (True), else one from the pool."""
        held = getattr(self._local, "conn", None)
        if held is not None:
            yield held, True
            return
        with self.pool.connection() as raw:
            conn = PgConn(raw)
            self._local.conn = conn
            try:
                yield conn, False
            finally:
                self._local.conn = None

    @contextmanager
    def tx(self, *, shared: bool = False, defer: bool = False) -> Iterator[Conn]:
        with self._checkout() as (conn, nested):
            if nested and conn.raw.info.transaction_status != 0:  # 0: idle, no transaction
                yield conn
                return
            lock = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
            with conn.raw.transaction():
                conn.raw.execute(f"SELECT {lock}(%s)", (self.write_key,))
                yield conn

    @contextmanager
    def read(self) -> Iterator[Conn]:
        with self._checkout() as (conn, _):
            yield conn

    def deferred(self) -> Deferred | None:
        """None: no group commit here (concurrent writers); every call writes at once."""
        return None

    def close(self) -> None:
        self.pool.close()


# reads one statement at a time ------------------------------------------------------------
class _Rows:
    """A cursor's rows, fetched before its connection went back."""

    def __init__(self, rows: list[Any], rowcount: int):
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class StatementConn:
    """A ``Conn`` for reads outside a transaction: each statement runs in its own ``read()``
    (on PostgreSQL a pooled connection, given back at once) and its rows are fetched before
    it returns, so one object serves every thread; each statement sees the latest commit, as
    autocommit reads did before. Inside a transaction its thread has open, it joins it."""

    def __init__(self, db: Database):
        self.db = db
        self.dialect = db.dialect

    def execute(self, sql: str, params: Params = ()) -> Cursor:
        with self.db.read() as conn:
            cur: Any = conn.execute(sql, params)
            rows = cur.fetchall() if cur.description else []
            return _Rows(rows, cur.rowcount)

    def executemany(self, sql: str, seq: Sequence[Params]) -> None:
        with self.db.read() as conn:
            conn.executemany(sql, seq)
