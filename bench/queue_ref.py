"""The reference arm: a minimal purpose-built ASGI queue server, to measure ours against.

    python -m bench.queue_ref --db ref.db --manifest jobs.toml --port 8123 --operator-token T

It speaks the endpoints the load generator uses, with the same paths and JSON shapes as
trainfleet's coordinator (enroll, register, claim, heartbeat, complete, and the batched
/v1/claims, /v1/heartbeats, /v1/completions), and keeps the essentials of the same tables
(``jobs``, ``workers``, ``events``, ``enrollments``) with the same rules: a claim takes the
first pending job by priority then manifest order that the worker's effective capability,
its host's deny rules and the job's ``allowed_hosts`` admit (``queue_mix.fits``), bumps the
epoch and writes a ``claimed`` event; heartbeats and completions are fenced on (worker,
epoch, active state) in the UPDATE's WHERE clause and write ``running``/``completed`` events.

What makes it fast is what it leaves out: raw ASGI (no framework, no pydantic), one SQLite
connection used directly on the event loop (no thread hops, no lock convoy), tokens and job
requirements held in memory, uvloop + httptools. No reaper, logs, artifacts, runs or
metrics: it is the practical ceiling for unbatched cycles through Python on this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sqlite3
import time
import tomllib
from pathlib import Path
from typing import Any

import uvicorn

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
MAX_BATCH = 64


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


def make_app(q: RefQueue) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        try:
            status, reply = route(q, scope, body)
        except (KeyError, ValueError, TypeError) as err:
            status, reply = 400, {"detail": f"bad request: {err}"}
        data = json.dumps(reply).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

    return app


def route(q: RefQueue, scope: dict[str, Any], body: bytes) -> tuple[int, Any]:
    method, path = scope["method"], scope["path"]
    if path == "/health":
        return 200, {"ok": True}
    token = ""
    for name, value in scope["headers"]:
        if name == b"authorization":
            token = value.decode().partition(" ")[2]
    data = json.loads(body) if body else {}
    if method != "POST":
        return 404, {"detail": "not found"}
    if path.startswith("/v1/hosts/") and path.endswith("/enroll"):
        if token != q.operator:
            return 401, {"detail": "wrong operator token"}
        host = path.split("/")[3]
        return 200, {"host": host, "token": q.enroll(host)}
    if path == "/v1/workers/register":
        if token not in q.hosts:
            return 401, {"detail": "unknown join token"}
        wid, wtoken = q.register(q.hosts[token], data["capability"])
        return 200, {"worker_id": wid, "token": wtoken, "heartbeat_interval_s": 2.0}
    if token not in q.workers:
        return 401, {"detail": "unknown worker token"}
    wid, host, cap = q.workers[token]
    if path == "/v1/workers/claim":
        got = q.claim(wid, host, cap, 1)
        return 200, {"claim": got[0] if got else None}
    if path == "/v1/claims":
        return 200, {"claims": q.claim(wid, host, cap, min(int(data["max_jobs"]), MAX_BATCH))}
    if path == "/v1/heartbeats":
        beats = [(b["job_id"], int(b["epoch"])) for b in data["beats"][:MAX_BATCH]]
        states = q.beat(wid, beats)
        return 200, {
            "replies": [
                {"job_id": j, "outcome": "ok" if s == "running" else s, "state": s, "cancel": False}
                for (j, _), s in zip(beats, states, strict=True)
            ]
        }
    if path == "/v1/completions":
        items = [(r["job_id"], int(r["epoch"]), r["result"]) for r in data["results"][:MAX_BATCH]]
        outcomes = q.complete(wid, items)
        return 200, {
            "outcomes": [
                {"job_id": j, "outcome": o} for (j, _, _), o in zip(items, outcomes, strict=True)
            ]
        }
    parts = path.split("/")  # /v1/jobs/{id}/heartbeat|complete
    if len(parts) == 5 and parts[2] == "jobs":
        jid, action = parts[3], parts[4]
        if action == "heartbeat":
            (state,) = q.beat(wid, [(jid, int(data["epoch"]))])
            if state == "fenced":
                return 409, {"detail": "stale epoch"}
            return 200, {"cancel": False, "state": state}
        if action == "complete":
            (outcome,) = q.complete(wid, [(jid, int(data["epoch"]), data.get("result", {}))])
            if outcome == "fenced":
                return 409, {"detail": "stale epoch"}
            return 200, {"id": jid, "state": "completed"}
    return 404, {"detail": "not found"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--operator-token", required=True)
    args = parser.parse_args()
    q = RefQueue(args.db, args.manifest, args.operator_token)
    uvicorn.run(
        make_app(q),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
