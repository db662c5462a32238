"""``trainfleet db status`` / ``db upgrade [--dry-run]``, and ``serve`` on a database newer
than the code: a clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainfleet.cli.main import app
from trainfleet.queue.db import open_database
from trainfleet.queue.migrations import latest, migrate
from trainfleet.queue.schema_v1 import sqlite_statements
from trainfleet.testing.postgres import fresh_schema, require_server

runner = CliRunner()


@pytest.fixture
def issue8_file(tmp_path: Path) -> Path:
    """A queue file as the issue-8 release left it: its tables, a job, no version record."""
    path = tmp_path / "queue.db"
    db = open_database(str(path))  # WAL, like the release
    with db.tx() as conn:
        for statement in sqlite_statements():
            conn.execute(statement)
        conn.execute(
            "INSERT INTO jobs (id, seq, name, spec, state, priority, require_cuda, min_vram_gib,"
            " min_ram_gib, min_cores, created_at, updated_at, manifest_hash)"
            " VALUES ('j', 1, 'a', '{\"kind\": \"command\"}', 'pending', 0, 0, 0, 0, 1, 1, 1,"
            " 'm')"
        )
    db.close()
    return path


@pytest.fixture
def pg_url() -> Iterator[str]:
    require_server()
    with fresh_schema() as url:
        yield url


def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as raw:
        return list(raw.iterdump())


def db(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["db", *args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def too_new(path: Path) -> None:
    database = open_database(str(path))
    migrate(database)
    with database.tx() as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'future', 0)",
            (latest() + 1,),
        )
    database.close()


def test_status_of_an_issue8_file_names_its_version_and_what_is_pending(
    issue8_file: Path,
) -> None:
    code, out = db("status", "--db", f"sqlite:///{issue8_file}")
    assert code == 0, out
    assert "schema version: 1 (issue-8 tables, not yet recorded" in out
    assert f"this trainfleet knows up to: {latest()}" in out
    assert f"pending: {latest()} migrations" in out
    code, out = db("status", "--db", str(issue8_file), "--json")
    assert code == 0
    assert json.loads(out)["version"] == 1 and json.loads(out)["untracked"] is True


def test_a_dry_run_prints_the_plan_and_changes_nothing(issue8_file: Path) -> None:
    before = dump(issue8_file)
    code, out = db("upgrade", "--db", str(issue8_file), "--dry-run", "--sql")
    assert code == 0, out
    assert f"would apply: {latest()} migrations" in out
    assert "1: issue-8 schema (adopts the issue-8 tables" in out
    assert "ALTER TABLE jobs ADD COLUMN kind" in out  # --sql: the steps themselves
    assert "dry run: nothing changed (schema version stays 1)" in out
    assert dump(issue8_file) == before


def test_upgrade_applies_the_plan_then_is_up_to_date(issue8_file: Path) -> None:
    code, out = db("upgrade", "--db", str(issue8_file))
    assert code == 0, out
    assert f"schema version 1 -> {latest()}" in out
    with sqlite3.connect(issue8_file) as raw:
        assert raw.execute("SELECT kind FROM jobs").fetchall() == [("command",)]
    code, out = db("upgrade", "--db", str(issue8_file))
    assert code == 0 and f"schema version {latest()}: up to date" in out
    code, out = db("status", "--db", str(issue8_file))
    assert code == 0 and "up to date" in out


def test_a_newer_database_is_refused_by_every_command_and_by_serve(tmp_path: Path) -> None:
    path = tmp_path / "state" / "queue.db"
    too_new(path)
    message = f"database schema is version {latest() + 1}; this trainfleet knows up to {latest()}"
    for args in (["status"], ["upgrade"], ["upgrade", "--dry-run"]):
        code, out = db(*args, "--db", str(path))
        assert code == 1 and message in " ".join(out.split()), (args, out)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = runner.invoke(
        app, ["serve", "--state-dir", str(path.parent), "--port", str(port)]
    )  # the default queue: STATE_DIR/queue.db
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_looking_at_a_missing_file_does_not_create_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.db"
    for args in (["status"], ["upgrade", "--dry-run"]):
        code, out = db(*args, "--db", str(path))
        assert code == 1 and f"no database at {path}" in " ".join(out.split())
    assert not path.exists()


def test_an_unsupported_url_is_a_usage_error() -> None:
    code, out = db("status", "--db", "mysql://x/y")
    assert code == 2 and "unsupported database URL" in out


def test_an_unreachable_server_is_one_clear_line() -> None:
    code, out = db("status", "--db", "postgresql://postgres:secret@127.0.0.1:1/test")
    assert code == 1 and "cannot open postgresql://postgres:***@127.0.0.1:1/test" in out
    assert "secret" not in out


def test_postgres_upgrade_dry_run_then_upgrade_then_status(pg_url: str) -> None:
    code, out = db("upgrade", "--db", pg_url, "--dry-run")
    assert code == 0, out
    assert f"would apply: {latest()} migrations" in out and "stays 0" in out
    code, out = db("status", "--db", pg_url)
    assert code == 0 and "schema version: 0" in out
    code, out = db("upgrade", "--db", pg_url)
    assert code == 0 and f"schema version 0 -> {latest()}" in out
    code, out = db("status", "--db", pg_url, "--json")
    assert code == 0 and json.loads(out)["version"] == latest()
