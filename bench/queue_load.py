"""The load generator: N simulated workers doing claim -> heartbeat -> complete, on asyncio.

Each worker registers for real (its host enrolled by the operator, its capability one of
``queue_mix.CLASSES``) and then loops on its own keep-alive connection until every seeded job
is completed. A claim that finds nothing is timed separately and the worker polls again after
``poll_s`` (the daemon's default is a long-poll or 1 s; a short poll keeps the tail short).
Batched workers claim up to ``batch`` jobs per request and heartbeat and complete them in one
request each. The generator's own CPU per request (getrusage of this process over the load
window) is reported so its cost can be compared with the server's.
"""

from __future__ import annotations

import asyncio
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from bench.queue_http import Conn
from bench.queue_mix import capability


@dataclass
class Worker:
    index: int
    host: str
    token: str
    url_index: int  # which coordinator it talks to
    interval_s: float = 2.0


@dataclass
class LoadStats:
    cycles: int = 0  # jobs claimed, heartbeat and completed
    requests: int = 0
    errors: int = 0
    got_ms: list[float] = field(default_factory=list)  # claims that got a job
    empty_ms: list[float] = field(default_factory=list)  # claims that found none
    beat_ms: list[float] = field(default_factory=list)  # heartbeat requests
    complete_ms: list[float] = field(default_factory=list)  # complete requests
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    error_examples: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(text)


def cpu_s() -> float:
    """This process's CPU seconds so far (user + system)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def enroll_and_register(
    ports: list[int],
    operator_token: str,
    n: int,
    *,
    num_hosts: int | None = None,
    host_offset: int = 0,
    concurrency: int = 32,
    register_extra: dict[str, Any] | None = None,
) -> list[Worker]:
    """Enroll hosts and register ``n`` workers: worker i on host h{host_offset + i % num_hosts},
    talking to coordinator i % len(ports), ``concurrency`` requests at a time."""
    num_hosts = num_hosts or n
    conns = [Conn("127.0.0.1", ports[i % len(ports)]) for i in range(concurrency)]
    host_tokens: dict[str, str] = {}

    async def enroll(c: Conn, names: list[str]) -> None:
        for name in names:
            reply = await c.call("POST", f"/v1/hosts/{name}/enroll", operator_token)
            host_tokens[name] = reply["token"]

    hosts = [f"h{host_offset + i}" for i in range(num_hosts)]
    await asyncio.gather(*(enroll(c, hosts[k::concurrency]) for k, c in enumerate(conns)))
    workers: list[Worker | None] = [None] * n

    async def register(k: int) -> None:
        for i in range(k, n, concurrency):
            host = f"h{host_offset + i % num_hosts}"
            c = conns[k] if len(ports) == 1 else Conn("127.0.0.1", ports[i % len(ports)])
            body = {"capability": capability(i, host), **(register_extra or {})}
            reply = await c.call("POST", "/v1/workers/register", host_tokens[host], body)
            if c is not conns[k]:
                c.close()
            interval = float(reply.get("heartbeat_interval_s", 2.0))
            workers[i] = Worker(i, host, reply["token"], i % len(ports), interval)

    await asyncio.gather(*(register(k) for k in range(concurrency)))
    for c in conns:
        c.close()
    return [w for w in workers if w is not None]


async def drain(
    ports: list[int],
    workers: list[Worker],
    total_jobs: int,
    *,
    batch: int = 0,
    poll_s: float = 0.2,
    timeout_s: float = 600.0,
) -> LoadStats:
    """Run ``workers`` until ``total_jobs`` are completed (or ``timeout_s`` passes).

    ``batch`` = 0: the single-job endpoints; k > 0: /v1/claims with max_jobs=k,
    /v1/heartbeats and /v1/completions.
    """
    stats = LoadStats()
    done = asyncio.Event()
    conns = [Conn("127.0.0.1", ports[w.url_index]) for w in workers]

    def finished(k: int) -> None:
        stats.cycles += k
        if stats.cycles >= total_jobs:
            done.set()

    async def one(w: Worker, c: Conn) -> None:
        while not done.is_set():
            try:
                if batch:
                    got = await batched_cycle(c, w, batch, stats)
                else:
                    got = await cycle(c, w, stats)
            except Exception as err:  # counted and shown; the run goes on
                stats.error(f"{type(err).__name__}: {err}")
                await asyncio.sleep(poll_s)
                continue
            if got:
                finished(got)
            else:
                await asyncio.sleep(poll_s)

    cpu0, t0 = cpu_s(), time.perf_counter()
    tasks = [asyncio.create_task(one(w, c)) for w, c in zip(workers, conns, strict=True)]
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    except TimeoutError:
        stats.error(f"timed out after {timeout_s:.0f}s with {stats.cycles}/{total_jobs} done")
    stats.wall_s = time.perf_counter() - t0
    stats.client_cpu_s = cpu_s() - cpu0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    stats.requests = sum(c.requests for c in conns)
    for c in conns:
        c.close()
    return stats


async def cycle(c: Conn, w: Worker, stats: LoadStats) -> int:
    t0 = time.perf_counter()
    reply = await c.call("POST", "/v1/workers/claim", w.token)
    ms = 1000 * (time.perf_counter() - t0)
    claim = reply["claim"]
    if claim is None:
        stats.empty_ms.append(ms)
        return 0
    stats.got_ms.append(ms)
    job_id, epoch = claim["job"]["id"], claim["epoch"]
    t1 = time.perf_counter()
    await c.call("POST", f"/v1/jobs/{job_id}/heartbeat", w.token, {"epoch": epoch})
    t2 = time.perf_counter()
    await c.call("POST", f"/v1/jobs/{job_id}/complete", w.token, {"epoch": epoch, "result": {}})
    stats.beat_ms.append(1000 * (t2 - t1))
    stats.complete_ms.append(1000 * (time.perf_counter() - t2))
    return 1


async def batched_cycle(c: Conn, w: Worker, k: int, stats: LoadStats) -> int:
    t0 = time.perf_counter()
    reply = await c.call("POST", "/v1/claims", w.token, {"max_jobs": k})
    ms = 1000 * (time.perf_counter() - t0)
    claims = reply["claims"]
    if not claims:
        stats.empty_ms.append(ms)
        return 0
    stats.got_ms.append(ms)
    held = [{"job_id": cl["job"]["id"], "epoch": cl["epoch"]} for cl in claims]
    t1 = time.perf_counter()
    beats = await c.call("POST", "/v1/heartbeats", w.token, {"beats": held})
    stats.beat_ms.append(1000 * (time.perf_counter() - t1))
    for item in beats["replies"]:
        if item.get("outcome") != "ok":
            stats.error(f"heartbeat {item}")
    results = [{**h, "result": {}} for h in held]
    t2 = time.perf_counter()
    reply = await c.call("POST", "/v1/completions", w.token, {"results": results})
    stats.complete_ms.append(1000 * (time.perf_counter() - t2))
    accepted = 0
    for item in reply["outcomes"]:
        if item.get("outcome") == "accepted":
            accepted += 1
        else:
            stats.error(f"completion {item}")
    return accepted
