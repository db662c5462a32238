"""The coordinator's own CPU per cycle, in-process: no sockets, no HTTP parser, no load
generator in another process; the ASGI app called directly by N simulated workers.

    python -m bench.queue_inproc [--n 64] [--jobs 3000] [--rounds 3] [--batch K]
                                 [--profile FILE]

Each round measures the app with the fast path (``coordinator.fastpath``) and without it
(every request through Starlette's routing), alternately on fresh databases, and prints
this process's CPU milliseconds per claim + heartbeat + complete cycle (best of the rounds:
the figure least disturbed by a busy machine). A steadier A/B than ``bench.queue`` on a
shared machine, for changes to the request path; it leaves out uvicorn and the network.
``--batch K``: workers with K slots claim up to K jobs a request and beat and complete them
in one request each (``/v1/claims``, ``/v1/heartbeats``, ``/v1/completions``); the figure is
then CPU per job. ``--profile FILE``: cProfile of the last fast-path round, to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
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


async def drain_batched(app: Any, tokens: list[str], total: int, k: int) -> int:
    done = 0

    async def worker(token: str) -> None:
        nonlocal done
        while done < total:
            status, got = await call(app, "/v1/claims", token, b'{"max_jobs": %d}' % k)
            claims = got.get("claims") if status == 200 else None
            if not claims:
                await asyncio.sleep(0.01)
                continue
            held = [{"job_id": c["job"]["id"], "epoch": c["epoch"]} for c in claims]
            await call(app, "/v1/heartbeats", token, json.dumps({"beats": held}).encode())
            results = json.dumps({"results": [{**h, "result": {}} for h in held]}).encode()
            status, got = await call(app, "/v1/completions", token, results)
            if status == 200:
                done += sum(o["outcome"] == "accepted" for o in got["outcomes"])

    await asyncio.gather(*(worker(t) for t in tokens))
    return done


def measure(
    tmp: Path,
    n: int,
    jobs: int,
    fast: bool,
    batch: int = 0,
    profile: cProfile.Profile | None = None,
) -> float:
    """CPU ms per cycle (per job, batched) of ``jobs`` cycles by ``n`` workers, the fast
    path on or off."""
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
        tokens = []
        for i in range(n):
            record, token = queue.register_worker(Capability(**capability(i, f"h{i}")))
            if batch:
                queue.set_worker_slots(record.id, batch)
            tokens.append(token)
        app = create_app(coord)
        run = drain_batched(app, tokens, jobs, batch) if batch else drain(app, tokens, jobs)
        if profile is not None:
            profile.enable()
        cpu0 = time.process_time()
        done = asyncio.run(run)
        cpu = time.process_time() - cpu0
        if profile is not None:
            profile.disable()
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
    p.add_argument("--batch", type=int, default=0, help="jobs per request (0: unbatched)")
    p.add_argument("--profile", type=Path, help="write a cProfile of the last round here")
    args = p.parse_args()
    best: dict[bool, float] = {}
    unit = "job" if args.batch else "cycle"
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for fast in (False, True):
                prof = (
                    cProfile.Profile() if args.profile and fast and r == args.rounds - 1 else None
                )
                ms = measure(Path(tmp) / f"{r}-{fast}", args.n, args.jobs, fast, args.batch, prof)
                best[fast] = min(best.get(fast, ms), ms)
                print(f"round {r}: fast path {'on ' if fast else 'off'} {ms:.3f} ms/{unit}")
                if prof is not None:
                    prof.dump_stats(args.profile)
    print(f"best: off {best[False]:.3f}, on {best[True]:.3f} ms of CPU per {unit} (in-process)")


if __name__ == "__main__":
    main()
