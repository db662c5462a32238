"""The reference server's state: one SQLite connection, the job rules and tokens in memory.

The tables keep the essentials of trainfleet's (``jobs``, ``workers``, ``events``,
``enrollments``) with the same column names, so ``queue_check`` reads both alike. A claim
takes the first pending job by priority then manifest order that ``queue_mix.fits`` admits,
bumps the epoch and writes a ``claimed`` event; heartbeats and completions are fenced on
(worker, epoch, state) in the UPDATE's WHERE clause and write ``running``/``completed``
events. Every call runs directly on the caller's thread (the server's event loop).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
import tomllib
from pathlib import Path
from typing import Any

from bench.queue_mix import HostRule, JobReq, effective, fits

SCHEMA = """
CREATE TABLE jobs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, name TEXT NOT NULL,
  spec TEXT NOT NULL, state TEXT NOT NULL, priority INTEGER NOT NULL,
  require_cuda INTEGER NOT NULL, min_vram_gib REAL NOT NULL, min_ram_gib REAL NOT NULL,
  min_cores INTEGER NOT NULL, epoch INTEGER NOT NULL DEFAULT 0,
  attempt INTEGER NOT NULL DEFAULT 0, worker_id TEXT, host TEXT, claimed_at REAL,
  heartbeat_at REAL, finished_at REAL, updated_at REAL, result TEXT);
CREATE INDEX jobs_by_claim_order ON jobs (state, priority DESC, seq);
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
  at REAL NOT NULL, kind TEXT NOT NULL, from_state TEXT, to_state TEXT, worker_id TEXT,
  epoch INTEGER, detail TEXT NOT NULL DEFAULT '');
CREATE TABLE workers (id TEXT PRIMARY KEY, host TEXT NOT NULL, capability TEXT NOT NULL,
  token_hash TEXT NOT NULL UNIQUE, state TEXT NOT NULL, registered_at REAL NOT NULL,
  last_seen REAL NOT NULL, current_job TEXT);
CREATE TABLE enrollments (host TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE);
"""
EVENT = (
    "INSERT INTO events (job_id, at, kind, from_state, to_state, worker_id, epoch)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_manifest(path: Path) -> tuple[list[JobReq], dict[str, HostRule]]:
    """The jobs and host rules of a bench manifest (the subset ``queue_mix`` writes)."""
    data = tomllib.loads(path.read_text())
    rules = {
        name: HostRule(tuple(h.get("deny_jobs", ())), h.get("cuda"))
        for name, h in data.get("hosts", {}).items()
    }
    jobs = [
        JobReq(
            j["name"],
            int(j.get("priority", 0)),
            bool(j.get("require_cuda", False)),
            float(j.get("min_vram_gib", 0.0)),
            float(j.get("min_ram_gib", 0.0)),
            int(j.get("min_cores", 1)),
            tuple(j.get("allowed_hosts", ())),
        )
        for j in data.get("jobs", [])
    ]
    return jobs, rules


class RefQueue:
    """The state: one connection, the job requirements and the tokens, in memory."""

    def __init__(self, db: Path, manifest: Path, operator_token: str) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)
        self.operator = operator_token
        jobs, self.rules = read_manifest(manifest)
        self.reqs: dict[str, JobReq] = {}
        self.specs: dict[str, str] = {}
        rows = []
        now = time.time()
        for seq, job in enumerate(jobs):
            jid = hashlib.sha256(job.name.encode()).hexdigest()[:32]
            spec = json.dumps(
                {
                    "name": job.name,
                    "kind": "command",
                    "command": ["true"],
                    **{k: v for k, v in job.__dict__.items() if k != "name"},
                }
            )
            self.reqs[jid], self.specs[jid] = job, spec
            rows.append(
                (
                    jid,
                    seq,
                    job.name,
                    spec,
                    job.priority,
                    int(job.require_cuda),
                    job.min_vram_gib,
                    job.min_ram_gib,
                    job.min_cores,
                    now,
                )
            )
        self.conn.execute("BEGIN")
        self.conn.executemany(
            "INSERT INTO jobs (id, seq, name, spec, state, priority, require_cuda, min_vram_gib,"
            " min_ram_gib, min_cores, updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
            rows,
        )
        self.conn.execute("COMMIT")
        self.hosts: dict[str, str] = {}  # join token -> host
        self.workers: dict[str, tuple[str, str, dict[str, Any]]] = {}  # token -> id, host, cap

    def enroll(self, host: str) -> str:
        token = secrets.token_urlsafe(24)
        self.conn.execute(
            "INSERT INTO enrollments (host, token_hash) VALUES (?, ?) ON CONFLICT (host)"
            " DO UPDATE SET token_hash = excluded.token_hash",
            (host, _hash(token)),
        )
        self.hosts[token] = host
        return token

    def register(self, host: str, cap: dict[str, Any]) -> tuple[str, str]:
        token, wid = secrets.token_urlsafe(32), f"{host}-{secrets.token_hex(3)}"
        now = time.time()
        cap = {**cap, "host": host}
        self.conn.execute(
            "INSERT INTO workers (id, host, capability, token_hash, state, registered_at,"
            " last_seen) VALUES (?, ?, ?, ?, 'online', ?, ?)",
            (wid, host, json.dumps(cap), _hash(token), now, now),
        )
        self.workers[token] = (wid, host, effective(cap, self.rules.get(host)))
        return wid, token

    def claim(self, wid: str, host: str, cap: dict[str, Any], k: int) -> list[dict[str, Any]]:
        rule, now, c = self.rules.get(host), time.time(), self.conn
        out: list[dict[str, Any]] = []
        c.execute("BEGIN IMMEDIATE")
        try:
            limit, seen = 4 * k + 16, 0
            while True:  # candidates read first: no UPDATE while a SELECT on jobs is open
                ids = c.execute(
                    "SELECT id FROM jobs WHERE state = 'pending' AND (require_cuda = 0 OR ?)"
                    " AND min_vram_gib <= ? AND min_ram_gib <= ? AND min_cores <= ?"
                    " ORDER BY priority DESC, seq LIMIT ? OFFSET ?",
                    (
                        int(cap["cuda"]),
                        cap["vram_gib"],
                        cap["ram_gib"],
                        cap["cores"],
                        limit,
                        seen,
                    ),
                ).fetchall()
                fitting = [j for (j,) in ids if fits(self.reqs[j], host, cap, rule)]
                for jid in fitting[: k - len(out)]:
                    epoch, attempt = c.execute(
                        "UPDATE jobs SET state = 'claimed', epoch = epoch + 1,"
                        " attempt = attempt + 1, worker_id = ?, host = ?, claimed_at = ?,"
                        " heartbeat_at = ?, updated_at = ? WHERE id = ? AND state = 'pending'"
                        " RETURNING epoch, attempt",
                        (wid, host, now, now, now, jid),
                    ).fetchone()
                    c.execute(EVENT, (jid, now, "claimed", "pending", "claimed", wid, epoch))
                    out.append(
                        {
                            "job": {"id": jid, "spec": self.specs[jid]},
                            "epoch": epoch,
                            "attempt": attempt,
                        }
                    )
                if len(out) >= k or len(ids) < limit:
                    break
                seen += len(ids) - len(fitting)  # the claimed ones are no longer pending
                limit *= 2
            c.execute(
                "UPDATE workers SET last_seen = ?, current_job = ? WHERE id = ?",
                (now, out[0]["job"]["id"] if out else None, wid),
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return out

    def beat(self, wid: str, beats: list[tuple[str, int]]) -> list[str]:
        c, now, out = self.conn, time.time(), []
        c.execute("BEGIN IMMEDIATE")
        for jid, epoch in beats:
            fence = (now, now, jid, wid, epoch)
            if c.execute(
                "UPDATE jobs SET state = 'running', heartbeat_at = ?, updated_at = ?"
                " WHERE id = ? AND worker_id = ? AND epoch = ? AND state = 'claimed'",
                fence,
            ).rowcount:
                c.execute(EVENT, (jid, now, "running", "claimed", "running", wid, epoch))
                out.append("running")
            elif c.execute(
                "UPDATE jobs SET heartbeat_at = ?, updated_at = ?"
                " WHERE id = ? AND worker_id = ? AND epoch = ? AND state = 'running'",
                fence,
            ).rowcount:
                out.append("running")
            else:
                out.append("fenced")
        c.execute("UPDATE workers SET last_seen = ? WHERE id = ?", (now, wid))
        c.execute("COMMIT")
        return out

    def complete(self, wid: str, results: list[tuple[str, int, Any]]) -> list[str]:
        c, now, out = self.conn, time.time(), []
        c.execute("BEGIN IMMEDIATE")
        for jid, epoch, result in results:
            outcome = "fenced"
            for was in ("running", "claimed"):
                if c.execute(
                    "UPDATE jobs SET state = 'completed', result = ?, finished_at = ?,"
                    " updated_at = ? WHERE id = ? AND worker_id = ? AND epoch = ? AND state = ?",
                    (json.dumps(result), now, now, jid, wid, epoch, was),
                ).rowcount:
                    c.execute(EVENT, (jid, now, "completed", was, "completed", wid, epoch))
                    outcome = "accepted"
                    break
            out.append(outcome)
        c.execute("UPDATE workers SET current_job = NULL, last_seen = ? WHERE id = ?", (now, wid))
        c.execute("COMMIT")
        return out
