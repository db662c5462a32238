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
Its state and SQL live in ``queue_ref_store``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import uvicorn

from bench.queue_ref_store import RefQueue

MAX_BATCH = 64


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
