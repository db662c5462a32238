"""The fleet arm: F registered workers each holding a long job and heartbeating it at the
interval the coordinator advertises, while 64 other workers claim and complete short jobs.

The manifest has F long jobs at priority 3 (above every short job) and the usual mix of
short ones. The F fleet workers register (100 hosts), then each claims a long job and from
that moment heartbeats it, as a worker does: at the interval from its register reply,
updated from every heartbeat reply. They share a pool of 128 keep-alive connections (10,000
sockets are not needed to make 10,000 workers' requests; a beat's latency includes waiting
for a free connection). Once every fleet worker holds its job, 64 claimers run claim ->
heartbeat -> complete cycles for ``seconds``. Measured over that window: the claimers' claim
p50/p99 and cycles/s, the beats' latency and rate, both sides' CPU; afterwards, from the
event log, the false requeues (every requeue is one: no worker dies here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from bench.queue_check import check
from bench.queue_http import Conn
from bench.queue_load import LoadStats, Worker, cpu_s, cycle, enroll_and_register, pct
from bench.queue_mix import JobReq, host_rules, job_reqs, manifest_toml
from bench.queue_profile import WINDOW_ENV
from bench.queue_servers import Servers

FLEET_HOSTS = 100  # the fleet's workers share hosts h0..h99; the claimers get their own


def fleet_jobs(fleet: int, short: int, seed: int) -> list[JobReq]:
    long = [JobReq(f"fl-any-{i:06d}", 3) for i in range(fleet)]
    return long + job_reqs(short, seed, prefix="s")


class Fleet:
    """The fleet's workers, sharing a pool of keep-alive connections per coordinator."""

    def __init__(self, ports: list[int], workers: list[Worker], pool_size: int = 128) -> None:
        self.workers = workers
        self.pools: list[asyncio.Queue[Conn]] = []
        for port in ports:
            q: asyncio.Queue[Conn] = asyncio.Queue()
            for _ in range(max(1, pool_size // len(ports))):
                q.put_nowait(Conn("127.0.0.1", port))
            self.pools.append(q)
        self.held: dict[int, tuple[str, int]] = {}
        self.claiming = asyncio.Semaphore(32)  # claims in flight while the fleet forms
        self.formed = asyncio.Event()
        self.tried = 0
        self.stop = asyncio.Event()
        self.beat_ms: list[float] = []
        self.beat_errors = 0
        self.interval_s = 0.0

    async def call(self, w: Worker, path: str, payload: Any = None) -> Any:
        pool = self.pools[w.url_index]
        c = await pool.get()
        try:
            return await c.call("POST", path, w.token, payload)
        finally:
            pool.put_nowait(c)

    async def life(self, w: Worker) -> None:
        """Claim a long job, then heartbeat it from the first moment, as a worker does."""
        async with self.claiming:
            try:
                claim = (await self.call(w, "/v1/workers/claim"))["claim"]
            finally:
                self.tried += 1
                if self.tried == len(self.workers):
                    self.formed.set()
        if claim is None:
            return
        job_id, epoch = claim["job"]["id"], claim["epoch"]
        self.held[w.index] = (job_id, epoch)
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                reply = await self.call(w, f"/v1/jobs/{job_id}/heartbeat", {"epoch": epoch})
                w.interval_s = float(reply.get("heartbeat_interval_s") or w.interval_s)
            except Exception:
                self.beat_errors += 1
            self.beat_ms.append(1000 * (time.perf_counter() - t0))
            self.interval_s = max(self.interval_s, w.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), w.interval_s)

    async def complete_all(self) -> int:
        sem, done = asyncio.Semaphore(64), [0]

        async def one(w: Worker) -> None:
            job_id, epoch = self.held[w.index]
            async with sem:
                await self.call(w, f"/v1/jobs/{job_id}/complete", {"epoch": epoch, "result": {}})
            done[0] += 1

        await asyncio.gather(
            *(one(w) for w in self.workers if w.index in self.held), return_exceptions=True
        )
        return done[0]

    def close(self) -> None:
        for q in self.pools:
            while not q.empty():
                q.get_nowait().close()


async def _claimers(
    ports: list[int], workers: list[Worker], stop: asyncio.Event, stats: LoadStats
) -> None:
    async def one(w: Worker) -> None:
        c = Conn("127.0.0.1", ports[w.url_index])
        while not stop.is_set():
            try:
                got = await cycle(c, w, stats)
            except Exception as err:
                stats.error(f"{type(err).__name__}: {err}")
                got = 0
            stats.cycles += got
            if not got:
                await asyncio.sleep(0.2)
        stats.requests += c.requests
        c.close()

    await asyncio.gather(*(one(w) for w in workers))


async def fleet_phase(
    s: Servers, fleet: int, claimers: int, seconds: float
) -> tuple[dict[str, Any], LoadStats]:
    """Register the fleet; each worker claims and starts beating; once every one holds its
    job, the claimers run for ``seconds``; then the fleet completes its jobs."""
    t0 = time.perf_counter()
    workers = await enroll_and_register(
        s.ports, s.operator_token, fleet, num_hosts=min(fleet, FLEET_HOSTS)
    )
    registered_s = time.perf_counter() - t0
    f = Fleet(s.ports, workers)
    lives = [asyncio.create_task(f.life(w)) for w in workers]
    await f.formed.wait()
    formed_s = time.perf_counter() - t0 - registered_s
    claim_workers = await enroll_and_register(
        s.ports, s.operator_token, claimers, host_offset=FLEET_HOSTS
    )
    info: dict[str, Any] = {
        "fleet_held": len(f.held),
        "setup_s": time.perf_counter() - t0,
        "register_per_s": fleet / registered_s,
        "fleet_claims_per_s": fleet / formed_s,
    }
    stats = LoadStats()
    stop = asyncio.Event()
    f.beat_ms.clear()
    beat_errors0 = f.beat_errors
    if os.environ.get(WINDOW_ENV):  # bench.queue_profile: profile this window only
        for proc in s.procs:
            proc.send_signal(signal.SIGUSR1)
    cpu0, srv0, w0 = cpu_s(), s.cpu_s(), time.perf_counter()
    claiming = asyncio.create_task(_claimers(s.ports, claim_workers, stop, stats))
    await asyncio.sleep(seconds)  # the measured window: a duration, not a wait for a state
    stop.set()
    await claiming
    stats.wall_s = time.perf_counter() - w0
    stats.client_cpu_s = cpu_s() - cpu0
    info["server_cpu_s"] = s.cpu_s() - srv0
    info.update(
        beats=len(f.beat_ms),
        beat_p50_ms=pct(f.beat_ms, 0.5),
        beat_p99_ms=pct(f.beat_ms, 0.99),
        beat_errors=f.beat_errors - beat_errors0,
        advertised_interval_s=f.interval_s,
    )
    f.stop.set()
    await asyncio.gather(*lives, return_exceptions=True)
    info["fleet_completed"] = await f.complete_all()
    f.close()
    return info, stats


def run_fleet(
    tmp: Path,
    fleet: int,
    claimers: int,
    seconds: float,
    short_jobs: int,
    *,
    db: str = "sqlite",
    coordinators: int = 1,
    pg_url: str = "",
) -> dict[str, Any]:
    """The fleet arm on ``db`` ("sqlite" or "postgresql") with ``coordinators`` servers."""
    from bench.queue_arms import Arm, run_async, servers_for

    tmp.mkdir(parents=True, exist_ok=True)
    jobs = fleet_jobs(fleet, short_jobs, seed=1)
    rules = host_rules(FLEET_HOSTS + claimers)
    manifest = tmp / "fleet.toml"
    manifest.write_text(manifest_toml(jobs, rules))
    arm = Arm("trainfleet", fleet, len(jobs), db=db, coordinators=coordinators)
    with servers_for(arm, tmp, manifest, pg_url) as s:
        info, stats = run_async(fleet_phase(s, fleet, claimers, seconds))
        s.stop()
        grace = 1.0 if db == "postgresql" else None  # as in queue_arms
        report = check(s.db, jobs, rules, grace_s=grace, require_all_completed=False)
    name = f"fleet_{db}" + (f"_{coordinators}coord" if coordinators > 1 else "") + f"_{fleet}"
    return {
        "arm": name,
        "db": db,
        "coordinators": coordinators,
        "fleet_workers": fleet,
        "claimers": claimers,
        "seconds": seconds,
        **info,
        "requests": stats.requests,
        "cycles": stats.cycles,
        "cycles_per_s": stats.cycles / stats.wall_s if stats.wall_s else 0.0,
        "claim_got_p50_ms": pct(stats.got_ms, 0.5),
        "claim_got_p99_ms": pct(stats.got_ms, 0.99),
        "claim_empty_p99_ms": pct(stats.empty_ms, 0.99),
        "claims_empty": len(stats.empty_ms),
        "beats_per_s": info.get("beats", 0) / stats.wall_s if stats.wall_s else 0.0,
        "server_cpu_cores": info["server_cpu_s"] / stats.wall_s if stats.wall_s else 0.0,
        "client_cpu_cores": stats.client_cpu_s / stats.wall_s if stats.wall_s else 0.0,
        "errors": stats.errors,
        "error_examples": stats.error_examples,
        "false_requeues": report.false_requeues,
        "check": report.as_dict(),
    }
