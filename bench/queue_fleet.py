"""The fleet arm: F registered workers each holding a long job and heartbeating it at the
interval the coordinator advertises, while 64 other workers claim and complete short jobs.

Setup: the manifest has F long jobs at priority 3 (above every short job) and the usual
mix of short ones; the F fleet workers (class 0, so any long job fits) register and claim
first, so each holds one long job. Then for ``seconds`` the fleet heartbeats (each worker
at its advertised interval, read from the register reply and updated from every heartbeat
reply, with a random phase) over a pool of keep-alive connections (10,000 sockets are not
needed to make 10,000 workers' requests), and the claimers run claim -> heartbeat ->
complete cycles. Measured: the claimers' claim p50/p99, cycles/s, the heartbeat latency, and
afterwards from the event log the false requeues (jobs requeued although their worker kept
beating: here every requeue is one, since no worker dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path
from typing import Any

from bench.queue_check import check
from bench.queue_http import Conn
from bench.queue_load import LoadStats, Worker, cpu_s, enroll_and_register, pct
from bench.queue_mix import JobReq, host_rules, job_reqs, manifest_toml
from bench.queue_servers import Servers

FLEET_HOSTS = 100  # the fleet's workers share hosts h0..h99; the claimers get their own


def fleet_jobs(fleet: int, short: int, seed: int) -> list[JobReq]:
    long = [JobReq(f"fl-any-{i:06d}", 3) for i in range(fleet)]
    return long + job_reqs(short, seed, prefix="s")


async def _claim_all(ports: list[int], workers: list[Worker], concurrency: int = 32) -> dict:
    """Each fleet worker claims its long job; returns worker index -> (job id, epoch)."""
    held: dict[int, tuple[str, int]] = {}

    async def run(k: int) -> None:
        c = Conn("127.0.0.1", ports[k % len(ports)])
        for w in workers[k::concurrency]:
            if w.url_index != k % len(ports):
                c2 = Conn("127.0.0.1", ports[w.url_index])
                reply = await c2.call("POST", "/v1/workers/claim", w.token)
                c2.close()
            else:
                reply = await c.call("POST", "/v1/workers/claim", w.token)
            if reply["claim"] is not None:
                held[w.index] = (reply["claim"]["job"]["id"], reply["claim"]["epoch"])
        c.close()

    await asyncio.gather(*(run(k) for k in range(concurrency)))
    return held


async def _beat_fleet(
    ports: list[int],
    workers: list[Worker],
    held: dict[int, tuple[str, int]],
    stop: asyncio.Event,
    out: dict[str, Any],
    pool_size: int = 128,
) -> None:
    pools: list[asyncio.Queue[Conn]] = []
    for port in ports:
        q: asyncio.Queue[Conn] = asyncio.Queue()
        for _ in range(pool_size // len(ports)):
            q.put_nowait(Conn("127.0.0.1", port))
        pools.append(q)
    beat_ms: list[float] = []
    intervals: list[float] = []
    errors = [0]
    rng = random.Random(1)

    async def one(w: Worker) -> None:
        job_id, epoch = held[w.index]
        await asyncio.sleep(rng.uniform(0, w.interval_s))
        while not stop.is_set():
            pool = pools[w.url_index]
            c = await pool.get()
            t0 = time.perf_counter()
            try:
                reply = await c.call(
                    "POST", f"/v1/jobs/{job_id}/heartbeat", w.token, {"epoch": epoch}
                )
                w.interval_s = float(reply.get("heartbeat_interval_s") or w.interval_s)
            except Exception:
                errors[0] += 1
            finally:
                pool.put_nowait(c)
            beat_ms.append(1000 * (time.perf_counter() - t0))
            intervals.append(w.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), w.interval_s)

    await asyncio.gather(*(one(w) for w in workers if w.index in held))
    out.update(
        beats=len(beat_ms),
        beat_p50_ms=pct(beat_ms, 0.5),
        beat_p99_ms=pct(beat_ms, 0.99),
        beat_errors=errors[0],
        advertised_interval_s=max(intervals) if intervals else float("nan"),
    )
    for q in pools:
        while not q.empty():
            q.get_nowait().close()


async def _claimers(
    ports: list[int], workers: list[Worker], stop: asyncio.Event, stats: LoadStats
) -> None:
    from bench.queue_load import _cycle

    async def one(w: Worker) -> None:
        c = Conn("127.0.0.1", ports[w.url_index])
        while not stop.is_set():
            try:
                got = await _cycle(c, w, stats)
            except Exception as err:
                stats.error(f"{type(err).__name__}: {err}")
                got = 0
            stats.cycles += got
            if not got:
                await asyncio.sleep(0.2)
        stats.requests += c.requests
        c.close()

    await asyncio.gather(*(one(w) for w in workers))


async def _complete_all(
    ports: list[int], workers: list[Worker], held: dict[int, tuple[str, int]]
) -> int:
    done = [0]

    async def run(k: int, group: list[Worker]) -> None:
        c = Conn("127.0.0.1", ports[k % len(ports)])
        for w in group:
            job_id, epoch = held[w.index]
            c2 = c if w.url_index == k % len(ports) else Conn("127.0.0.1", ports[w.url_index])
            await c2.call(
                "POST",
                f"/v1/jobs/{job_id}/complete",
                w.token,
                {"epoch": epoch, "result": {}},
                expect=(200, 409),
            )
            done[0] += 1
            if c2 is not c:
                c2.close()
        c.close()

    mine = [w for w in workers if w.index in held]
    await asyncio.gather(*(run(k, mine[k::32]) for k in range(32)))
    return done[0]


async def fleet_phase(
    s: Servers, fleet: int, claimers: int, seconds: float
) -> tuple[dict[str, Any], LoadStats]:
    """Register the fleet and the claimers, run both for ``seconds``, complete the fleet."""
    t0 = time.perf_counter()
    fleet_workers = await enroll_and_register(
        s.ports, s.operator_token, fleet, num_hosts=min(fleet, FLEET_HOSTS)
    )
    held = await _claim_all(s.ports, fleet_workers)
    setup_s = time.perf_counter() - t0
    claim_workers = await enroll_and_register(
        s.ports, s.operator_token, claimers, host_offset=FLEET_HOSTS
    )
    info: dict[str, Any] = {"fleet_held": len(held), "setup_s": setup_s}
    stats = LoadStats()
    stop = asyncio.Event()
    cpu0, srv0, w0 = cpu_s(), s.cpu_s(), time.perf_counter()
    beating = asyncio.create_task(_beat_fleet(s.ports, fleet_workers, held, stop, info))
    claiming = asyncio.create_task(_claimers(s.ports, claim_workers, stop, stats))
    await asyncio.sleep(seconds)  # the measured window: a duration, not a wait for a state
    stop.set()
    await asyncio.gather(beating, claiming)
    stats.wall_s = time.perf_counter() - w0
    stats.client_cpu_s = cpu_s() - cpu0
    info["server_cpu_s"] = s.cpu_s() - srv0
    info["fleet_completed"] = await _complete_all(s.ports, fleet_workers, held)
    return info, stats


def run_fleet(
    s_factory: Any, tmp: Path, fleet: int, claimers: int, seconds: float, short_jobs: int
) -> dict[str, Any]:
    from bench.queue_arms import run_async

    tmp.mkdir(parents=True, exist_ok=True)
    jobs = fleet_jobs(fleet, short_jobs, seed=1)
    rules = host_rules(FLEET_HOSTS + claimers)
    manifest = tmp / "fleet.toml"
    manifest.write_text(manifest_toml(jobs, rules))
    with s_factory(tmp, manifest) as s:
        info, stats = run_async(fleet_phase(s, fleet, claimers, seconds))
        s.stop()
        report = check(s.db, jobs, rules, grace_s=1.0, require_all_completed=False)
    return {
        "arm": f"fleet_{fleet}",
        "fleet_workers": fleet,
        "claimers": claimers,
        "seconds": seconds,
        **info,
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
