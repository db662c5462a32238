"""One arm of bench.queue: seed a fresh server, drain it with N workers, check the invariants.

An arm is (server: ours or the reference, database: SQLite or PostgreSQL, coordinators,
batch size, N). Every arm gets a new database and new server processes, loads the same
seeded manifest, registers N workers for real, runs them until every job is completed,
then stops the servers and replays the database's event log through ``queue_check``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench.queue_check import check
from bench.queue_load import drain, enroll_and_register, pct
from bench.queue_mix import host_rules, job_reqs, manifest_toml
from bench.queue_servers import Servers, fresh_postgres, reference_server, trainfleet_servers

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when it is installed (the generator's own overhead matters)."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


@dataclass(frozen=True)
class Arm:
    server: str  # "trainfleet" or "reference"
    n: int
    jobs: int
    db: str = "sqlite"  # or "postgresql"
    coordinators: int = 1
    batch: int = 0  # 0: single-job endpoints; k: up to k jobs per request
    long: bool = False  # a round of the long mode (``--long``), not one of the table's arms
    pair: int = 0  # which run of this arm and its reference (``--pairs``)

    @property
    def name(self) -> str:
        parts = [self.server, self.db, f"n{self.n}"]
        if self.coordinators > 1:
            parts.append(f"{self.coordinators}coord")
        parts.append(f"batch{self.batch}" if self.batch else "unbatched")
        if self.long:
            parts.append("long")
        if self.pair:
            parts.append(f"pair{self.pair + 1}")
        return "_".join(parts)


@contextlib.contextmanager
def servers_for(arm: Arm, tmp: Path, manifest: Path, pg_url: str) -> Iterator[Servers]:
    if arm.server == "reference":
        with reference_server(tmp, manifest) as s:
            yield s
    elif arm.db == "postgresql":
        with (
            fresh_postgres(pg_url) as url,
            trainfleet_servers(tmp, manifest, url, arm.coordinators) as s,
        ):
            yield s
    else:
        with trainfleet_servers(tmp, manifest, None, arm.coordinators) as s:
            yield s


def run_arm(arm: Arm, tmp: Path, *, seed: int = 0, pg_url: str = "") -> dict[str, Any]:
    """Measure one arm; its figures and its invariant report, as a flat dict."""
    tmp.mkdir(parents=True, exist_ok=True)
    jobs, rules = job_reqs(arm.jobs, seed), host_rules(arm.n)
    manifest = tmp / "bench.toml"
    manifest.write_text(manifest_toml(jobs, rules))
    extra = {"slots": arm.batch} if arm.batch else None
    report = None
    with servers_for(arm, tmp, manifest, pg_url) as s:
        workers = run_async(
            enroll_and_register(s.ports, s.operator_token, arm.n, register_extra=extra)
        )
        cpu0 = s.cpu_s()
        # A stuck run ends: at least 20 jobs/s or 10 minutes, whichever is longer.
        limit = max(600.0, arm.jobs / 20)
        stats = run_async(drain(s.ports, workers, arm.jobs, batch=arm.batch, timeout_s=limit))
        server_cpu = s.cpu_s() - cpu0
        s.stop()
        # Several writers commit events out of sequence order: allow a claim in flight.
        grace = 1.0 if arm.db == "postgresql" else None
        report = check(s.db, jobs, rules, grace_s=grace)
    cycles = max(stats.cycles, 1)
    return {
        "arm": arm.name,
        "server": arm.server,
        "db": arm.db,
        "coordinators": arm.coordinators,
        "batch": arm.batch,
        "long": arm.long,
        "pair": arm.pair,
        "n": arm.n,
        "jobs": arm.jobs,
        "cycles": stats.cycles,
        "cycles_per_s": stats.cycles / stats.wall_s if stats.wall_s else 0.0,
        "wall_s": stats.wall_s,
        "claim_got_p50_ms": pct(stats.got_ms, 0.50),
        "claim_got_p99_ms": pct(stats.got_ms, 0.99),
        "claim_empty_p50_ms": pct(stats.empty_ms, 0.50),
        "claim_empty_p99_ms": pct(stats.empty_ms, 0.99),
        "heartbeat_p50_ms": pct(stats.beat_ms, 0.50),
        "heartbeat_p99_ms": pct(stats.beat_ms, 0.99),
        "complete_p50_ms": pct(stats.complete_ms, 0.50),
        "complete_p99_ms": pct(stats.complete_ms, 0.99),
        "claims_got": len(stats.got_ms),
        "claims_empty": len(stats.empty_ms),
        "server_cpu_ms_per_cycle": 1000 * server_cpu / cycles,
        "client_cpu_ms_per_request": 1000 * stats.client_cpu_s / max(stats.requests, 1),
        "requests": stats.requests,
        "errors": stats.errors,
        "error_examples": stats.error_examples,
        "check": report.as_dict(),
    }
