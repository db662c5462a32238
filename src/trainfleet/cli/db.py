"""``trainfleet db``: the coordinator database's schema version, and upgrading it.

A coordinator upgrades its database itself when it starts (``queue.migrations``); these
commands let an operator look first (``status``, ``upgrade --dry-run``) or upgrade ahead of a
rollout, for instance before starting several coordinators on one PostgreSQL database.
Neither needs a running coordinator: they open the database directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from trainfleet.cli.common import (
    DEFAULT_STATE,
    JsonOpt,
    StateOpt,
    console,
    errors,
    fail,
    print_json,
)

if TYPE_CHECKING:
    from trainfleet.queue.db import Database
    from trainfleet.queue.migrations import Migration

app = typer.Typer(
    name="db",
    help="The coordinator's database: its schema version, and upgrading it.",
    no_args_is_help=True,
)

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Database URL: sqlite:///PATH, a PATH ending in .db, or postgresql://..."
        " Default: the coordinator's, sqlite:///STATE_DIR/queue.db.",
        show_default=False,
    ),
]


@app.command()
def status(db: DbOpt = None, state_dir: StateOpt = DEFAULT_STATE, as_json: JsonOpt = False) -> None:
    """Print the database's schema version, the newest this trainfleet knows, and what an
    upgrade would apply. Exits 1 when the database is newer than this trainfleet."""
    from trainfleet.queue.migrations import schema_state

    url = _url(db, state_dir)
    with errors(), _open(url, create=False) as database:
        state = schema_state(database)
    pending = [] if state.version > state.known else state.pending
    if as_json:
        print_json(
            {
                "database": _redact(url),
                "version": state.version,
                "known": state.known,
                "untracked": state.untracked,
                "pending": [{"version": m.version, "name": m.name} for m in pending],
            }
        )
    else:
        note = " (issue-8 tables, not yet recorded: an upgrade records them)"
        _say(f"database: {_redact(url)}")
        _say(f"schema version: {state.version}{note if state.untracked else ''}")
        _say(f"this trainfleet knows up to: {state.known}")
        _say(_plan_line(pending, "pending") if pending else "up to date")
    with errors():
        state.check()


@app.command()
def upgrade(
    db: DbOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; change nothing.")
    ] = False,
    sql: Annotated[bool, typer.Option("--sql", help="Print each migration's SQL too.")] = False,
) -> None:
    """Apply the migrations the database lacks, in order, each in its own transaction."""
    from trainfleet.queue.migrations import migrate, schema_state

    url = _url(db, state_dir)
    with errors(), _open(url, create=not dry_run) as database:
        before = schema_state(database)
        plan = migrate(database, dry_run=dry_run)
        after = schema_state(database).version
        _say(f"database: {_redact(url)}")
        if not plan:
            _say(f"schema version {before.version}: up to date")
            return
        verb = "would apply" if dry_run else "applied"
        _say(_plan_line(plan, verb))
        for migration in plan:
            adopt = migration.version == 1 and before.untracked
            extra = " (adopts the issue-8 tables: adds only what is missing)" if adopt else ""
            _say(f"  {migration.version}: {migration.name}{extra}")
            if sql:
                for text in migration.describe(database.dialect):
                    end = "" if text.startswith("--") else ";"
                    _say("      " + text.replace("\n", "\n      ") + end)
        if dry_run:
            _say(f"dry run: nothing changed (schema version stays {before.version})")
        else:
            _say(f"schema version {before.version} -> {after}")


def _plan_line(plan: list[Migration], verb: str) -> str:
    versions = ", ".join(str(m.version) for m in plan)
    return f"{verb}: {len(plan)} migration{'s' * (len(plan) != 1)} ({versions})"


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _url(db: str | None, state_dir: Path) -> str:
    return db or f"sqlite:///{state_dir / 'queue.db'}"


@contextmanager
def _open(url: str, *, create: bool) -> Iterator[Database]:
    """Open the database at ``url``; a SQLite file that does not exist is refused unless
    ``create`` (a look must not leave an empty file behind)."""
    from trainfleet.queue.db import open_database

    path = _sqlite_path(url)
    if path is not None and not create and path != ":memory:" and not Path(path).exists():
        fail(f"no database at {path} (a coordinator creates it when it first starts)")
    try:
        if url.startswith(("postgresql://", "postgres://")):  # one quick try: a pool would
            # retry for seconds, logging each failure, before giving up
            import psycopg

            psycopg.connect(url, connect_timeout=5).close()
        database = open_database(url)
    except ValueError as err:
        fail(str(err), 2)
    except _driver_errors() as err:  # unreachable server, bad credentials, unwritable path
        fail(f"cannot open {_redact(url)}: {_why(err, url)}")
    try:
        yield database
    except _driver_errors() as err:  # a file or schema that is not a trainfleet queue
        fail(
            f"{_redact(url)} is not a trainfleet database this version can read or upgrade:"
            f" {_why(err, url)}"
        )
    finally:
        database.close()


def _why(err: BaseException, url: str) -> str:
    """The first line of a driver's error, with the URL (libpq quotes it) redacted."""
    text = str(err).replace(url, _redact(url)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _driver_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    import psycopg
    import psycopg_pool

    return (OSError, sqlite3.Error, psycopg.Error, psycopg_pool.PoolTimeout)


def _sqlite_path(url: str) -> str | None:
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///")
    return None if "://" in url else url


def _redact(url: str) -> str:
    """The URL without its passwords, for printing (``queue.db.redact``)."""
    from trainfleet.queue.db import redact

    return redact(url)
