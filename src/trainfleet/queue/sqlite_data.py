"""The SQLite queue's data-plane tables: published routers, the coordinator's shard plans,
and the shard ledger (its rules are in ``queue.ledger``)."""

from __future__ import annotations

import json
from typing import Any

from trainfleet.data.spec import DatasetSpec, dataset_digest
from trainfleet.errors import BadRequest, NotFound
from trainfleet.queue.base import RouterRecord
from trainfleet.queue.db import Conn
from trainfleet.queue.fleet_cache import SPECS
from trainfleet.queue.ledger import (
    ShardReport,
    mismatch_flag,
    plan_flags,
    reported_digest,
    shard_reports,
)
from trainfleet.queue.shard_plans import ExpectedShards
from trainfleet.queue.sqlite_schema import insert_event


def publish_router(
    conn: Conn, fit_id: str, digest: str, body: dict[str, Any], now: float
) -> RouterRecord:
    conn.execute(
        "INSERT INTO routers (fit_id, digest, body, published_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (fit_id) DO UPDATE SET digest = excluded.digest, body = excluded.body,"
        " published_at = excluded.published_at",
        (fit_id, digest, json.dumps(body), now),
    )
    return RouterRecord(fit_id=fit_id, digest=digest, published_at=now)


def get_router(conn: Conn, fit_id: str) -> dict[str, Any]:
    row = conn.execute("SELECT body FROM routers WHERE fit_id = ?", (fit_id,)).fetchone()
    if row is None:
        raise NotFound(f"no router published for fit id {fit_id}")
    body: dict[str, Any] = json.loads(row["body"])
    return body


def stored_plan(conn: Conn, digest: str) -> ExpectedShards | None:
    """The coordinator's plan of dataset ``digest``, if it was made."""
    row = conn.execute("SELECT * FROM shard_plans WHERE dataset_digest = ?", (digest,)).fetchone()
    if row is None:
        return None
    return ExpectedShards(
        digest=digest, status=row["status"], detail=row["detail"], shards=json.loads(row["shards"])
    )


def has_plan(conn: Conn, digest: str) -> bool:
    """Whether the coordinator's plan of dataset ``digest`` was made (without loading it)."""
    sql = "SELECT 1 FROM shard_plans WHERE dataset_digest = ?"
    return conn.execute(sql, (digest,)).fetchone() is not None


def store_plan(conn: Conn, plan: ExpectedShards, now: float) -> None:
    """Keep the first plan made of a digest (two made at once are equal: pure functions)."""
    conn.execute(
        "INSERT INTO shard_plans (dataset_digest, status, detail, shards, planned_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (dataset_digest) DO NOTHING",
        (plan.digest, plan.status, plan.detail, json.dumps(plan.shards), now),
    )


def job_dataset(conn: Conn, job_id: str) -> DatasetSpec | None:
    """The dataset spec of job ``job_id`` (None without one, or without such a job)."""
    row = conn.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return SPECS.get(job_id, row["spec"]).trained_dataset if row is not None else None


def _first_reports(
    conn: Conn,
    reports: list[ShardReport],
    job_id: str,
    worker_id: str,
    now: float,
) -> list[str]:
    """The fallback for a dataset the coordinator could not plan: the first report of a shard
    is recorded, later ones are compared with it."""
    flags = []
    for report in reports:
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
    return flags


def check_shards(
    conn: Conn,
    job_id: str,
    worker_id: str,
    epoch: int,
    result: dict[str, Any],
    now: float,
) -> list[str]:
    """Check a result's shard hashes against the coordinator's plan of the job's dataset (see
    ``queue.ledger``); flag the job where they disagree. ``BadRequest`` (and nothing written:
    the caller's transaction rolls back) when the result names another dataset digest."""
    row = conn.execute("SELECT spec, flags FROM jobs WHERE id = ?", (job_id,)).fetchone()
    spec = SPECS.get(job_id, row["spec"])
    dataset = spec.trained_dataset
    reports = shard_reports(result)
    digest = reported_digest(result)
    mismatches: list[str] = []
    notes: list[str] = []
    if dataset is None:
        if reports:
            notes.append(
                f"reports {len(reports)} shard hash(es) of dataset {reports[0].dataset_digest[:12]}"
                " but the job has no dataset: not recorded"
            )
    else:
        own = dataset_digest(dataset)
        if digest is not None and digest != own:
            raise BadRequest(
                f"result of job {spec.name} reports dataset digest {digest[:16]}, but the job's"
                f" dataset {dataset.name!r} has digest {own[:16]}: it trained on another spec",
                reported_digest=digest,
                expected_digest=own,
            )
        plan = stored_plan(conn, own)
        if not reports:
            notes.append(f"dataset job reported no shard hashes for {dataset.name!r}")
        elif plan is not None and plan.status == "planned":
            mismatches = plan_flags(reports, plan.shards, spec.path)
        else:
            why = plan.detail if plan is not None else "the coordinator has no plan of it"
            notes.append(f"unverified: shard hashes of {dataset.name!r} not checked ({why})")
            mismatches = _first_reports(conn, reports, job_id, worker_id, now)
    flags = mismatches + notes
    if flags:
        conn.execute(
            "UPDATE jobs SET flags = ? WHERE id = ?",
            (json.dumps(json.loads(row["flags"]) + flags), job_id),
        )
        for flag in flags:
            kind = "shard_mismatch" if flag in mismatches else "data_flag"
            insert_event(conn, now, job_id, kind, None, None, worker_id, epoch, flag)
    return flags
