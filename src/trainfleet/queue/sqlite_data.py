"""The SQLite queue's data-plane tables: published routers and the shard ledger."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from trainfleet.errors import NotFound
from trainfleet.queue.base import RouterRecord
from trainfleet.queue.ledger import mismatch_flag, shard_reports
from trainfleet.queue.sqlite_schema import insert_event


def publish_router(
    conn: sqlite3.Connection, fit_id: str, digest: str, body: dict[str, Any], now: float
) -> RouterRecord:
    conn.execute(
        "INSERT INTO routers (fit_id, digest, body, published_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (fit_id) DO UPDATE SET digest = excluded.digest, body = excluded.body,"
        " published_at = excluded.published_at",
        (fit_id, digest, json.dumps(body), now),
    )
    return RouterRecord(fit_id=fit_id, digest=digest, published_at=now)


def get_router(conn: sqlite3.Connection, fit_id: str) -> dict[str, Any]:
    row = conn.execute("SELECT body FROM routers WHERE fit_id = ?", (fit_id,)).fetchone()
    if row is None:
        raise NotFound(f"no router published for fit id {fit_id}")
    body: dict[str, Any] = json.loads(row["body"])
    return body


def check_shards(
    conn: sqlite3.Connection,
    job_id: str,
    worker_id: str,
    epoch: int,
    result: dict[str, Any],
    now: float,
) -> list[str]:
    """Record the result's shard hashes; flag the job where one disagrees with the ledger."""
    flags: list[str] = []
    for report in shard_reports(result):
        row = conn.execute(
            "SELECT sha256, job_id FROM shard_hashes WHERE dataset_digest = ? AND shard_key = ?",
            (report.dataset_digest, report.key),
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO shard_hashes (dataset_digest, shard_key, sha256, job_id, worker_id,"
                " recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
                (report.dataset_digest, report.key, report.sha256, job_id, worker_id, now),
            )
        elif row["sha256"] != report.sha256:
            flags.append(mismatch_flag(report, row["sha256"], row["job_id"]))
    if flags:
        existing = json.loads(
            conn.execute("SELECT flags FROM jobs WHERE id = ?", (job_id,)).fetchone()["flags"]
        )
        conn.execute(
            "UPDATE jobs SET flags = ? WHERE id = ?", (json.dumps(existing + flags), job_id)
        )
        for flag in flags:
            insert_event(conn, now, job_id, "shard_mismatch", None, None, worker_id, epoch, flag)
    return flags
