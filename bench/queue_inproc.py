"""The coordinator's own CPU per cycle, in-process: no sockets, no HTTP parser, no load
generator in another process; the ASGI app called directly by N simulated workers.

    python -m bench.queue_inproc [--n 64] [--jobs 3000] [--rounds 3]

Each round measures the app with the fast path (``coordinator.fastpath``) and without it
(every request through Starlette's routing), alternately on fresh databases, and prints
this process's CPU milliseconds per claim + heartbeat + complete cycle (best of the rounds:
the figure least disturbed by a busy machine). A steadier A/B than ``bench.queue`` on a
shared machine, for changes to the request path; it leaves out uvicorn and the network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.queue_mix import capability, host_rules, job_reqs, manifest_toml
from trainfleet.artifacts import ArtifactStore
from trainfleet.capability.model import Capability
from trainfleet.coordinator import fastpath
from trainfleet.coordinator.app import create_app
from trainfleet.coordinator.state import Coordinator
from trainfleet.manifest.load import parse_manifest
from trainfleet.queue.sqlite import SQLiteQueue


async def call(app: Any, path: str, token: str, body: bytes) -> tuple[int, Any]:
    """One POST through the ASGI app; its status and decoded JSON body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"bench"),
            (b"authorization", f"Bearer {token}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    sent = False
    reply: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            reply["status"] = message["status"]
        else:
            reply["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return reply["status"], json.loads(reply["body"])


async def drain(app: Any, tokens: list[str], total: int) -> int:
    done = 0

    async def worker(token: str) -> None:
        nonlocal done
        while done < total:
            status, got = await call(app, "/v1/workers/claim", token, b"")
            claim = got.get("claim") if status == 200 else None
            if claim is None:
                await asyncio.sleep(0.01)
                continue
            job, epoch = claim["job"]["id"], claim["epoch"]
            await call(app, f"/v1/jobs/{job}/heartbeat", token, b'{"epoch": %d}' % epoch)
            status, _ = await call(
                app, f"/v1/jobs/{job}/complete", token, b'{"epoch": %d, "result": {}}' % epoch
            )
            done += status == 200

    await asyncio.gather(*(worker(t) for t in tokens))
    return done


def measure(tmp: Path, n: int, jobs: int, fast: bool) -> float:
    """CPU ms per cycle of ``jobs`` cycles by ``n`` workers, the fast path on or off."""
    parsers = fastpath.PARSERS
    if not fast:
        fastpath.PARSERS = {}
    try:
        queue = SQLiteQueue(tmp / "q.db")
        coord = Coordinator(
            queue=queue,
            store=ArtifactStore(tmp / "artifacts"),
            staging_dir=tmp / "staging",
            operator_token="op",
            join_token="join",
        )
        queue.apply_manifest(
            parse_manifest(manifest_toml(job_reqs(jobs), host_rules(n)), "bench.toml")
        )
        tokens = [queue.register_worker(Capability(**capability(i, f"h{i}")))[1] for i in range(n)]
        app = create_app(coord)
        cpu0 = time.process_time()
        done = asyncio.run(drain(app, tokens, jobs))
        cpu = time.process_time() - cpu0
        coord.db_executor.shutdown()
        queue.close()
        return 1000 * cpu / max(done, 1)
    finally:
        fastpath.PARSERS = parsers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    best: dict[bool, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for fast in (False, True):
                ms = measure(Path(tmp) / f"{r}-{fast}", args.n, args.jobs, fast)
                best[fast] = min(best.get(fast, ms), ms)
                print(f"round {r}: fast path {'on ' if fast else 'off'} {ms:.3f} ms/cycle")
    print(f"best: off {best[False]:.3f}, on {best[True]:.3f} ms of CPU per cycle (in-process)")


if __name__ == "__main__":
    main()
