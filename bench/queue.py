"""Queue throughput and latency of a live coordinator, beside a minimal reference server.

    python -m bench.queue                  (default sizes: ~10 min on 2 cores, half of it the
                                            10,000-worker fleet's registration)
    python -m bench.queue --quick          (under a minute)
    python -m bench.queue --jobs 100000    (the issue's 100k seeded jobs per arm)
    python -m bench.queue --arms sqlite,reference --sizes 64
    python -m bench.queue --arms sqlite,reference,batched --sizes 64 --pairs 5   (the goals
                                            on the median of 5 alternated pairs)
    python -m bench.queue --long           (also 1M claims, rounds of 100k jobs, checked)
    python -m bench.queue --arms fleet --fleet-on two   (the fleet on two PG coordinators)

Each arm starts fresh server processes on a fresh database, loads a seeded manifest (mixed
constraints, three priorities, host deny rules: ``queue_mix``), registers N workers for real
and drives them with an asyncio load generator over keep-alive HTTP/1.1 (``queue_load``)
until every job is claimed, heartbeat once and completed. Reported per arm: cycles/s, claim
latency p50/p99 for claims that got a job and for empty ones, the server's CPU per cycle
(psutil on its pid: steadier than throughput on a shared machine) and the generator's CPU
per request. Arms: ``sqlite`` and ``postgresql`` (ours, one coordinator), ``two`` (two
coordinators on one PostgreSQL database), ``batched`` (up to --batch jobs per request, ours
and the reference), ``pgbatched`` (ours batched on PostgreSQL), ``reference``
(``queue_ref``: a minimal ASGI server with the same SQL essentials and fencing), ``fleet``
(``queue_fleet``: --fleet workers heartbeating while 64 claim). Every arm ends with the
invariant checks of ``queue_check`` on the database.
Defaults use --jobs 3000 per arm (300 at N = 1, --pg-jobs 1000 on PostgreSQL) to fit a few
minutes; say --jobs 100000 --pg-jobs 100000 for the issue's size.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
import traceback
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import RESULTS, environment, package_version, write_result
from bench.queue_arms import Arm, run_arm
from bench.queue_fleet import run_fleet
from bench.queue_report import ANCHORS, goals, print_table
from bench.queue_servers import postgres_reachable, trainfleet_servers

ALL_ARMS = ("sqlite", "reference", "postgresql", "two", "batched", "pgbatched", "fleet")
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    p.add_argument("--arms", default=",".join(ALL_ARMS), help=f"comma list of {ALL_ARMS}")
    p.add_argument("--sizes", default="1,16,64,256", help="N concurrent workers, comma list")
    p.add_argument("--jobs", type=int, default=3000, help="seeded jobs per arm (300 at N=1)")
    p.add_argument("--batch", type=int, default=8, help="jobs per request in batched arms")
    p.add_argument("--batch-n", type=int, default=16, help="workers in batched arms")
    p.add_argument("--pg-n", type=int, default=64, help="workers in the PostgreSQL arms")
    p.add_argument("--pg-jobs", type=int, default=1000, help="jobs in the PostgreSQL arms")
    p.add_argument("--fleet", type=int, default=10_000, help="heartbeating workers (fleet)")
    p.add_argument("--fleet-s", type=float, default=20.0, help="fleet arm's measured window")
    p.add_argument(
        "--fleet-on",
        choices=("sqlite", "postgresql", "two"),
        default="sqlite",
        help="the fleet arm's coordinator(s): SQLite, PostgreSQL, or two on PostgreSQL",
    )
    p.add_argument("--db", default=PG_DEFAULT, help="PostgreSQL server for the PG arms")
    p.add_argument(
        "--long", action="store_true", help="also 1M claims at N=64 on SQLite (rounds of 100k)"
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="run each of our SQLite arms and its reference this many times, alternately;"
        " the goals take the median pair (a shared machine's noise moves single runs)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "queue.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.jobs, args.fleet, args.fleet_s = "1,16", 300, 300, 5.0
    return args


def batch_supported(tmp: Path) -> str | None:
    """None if ``trainfleet serve`` offers POST /v1/claims, else why the arm is skipped."""
    manifest = tmp / "probe.toml"
    manifest.write_text("")
    with trainfleet_servers(tmp / "probe", manifest) as s:
        url = f"http://127.0.0.1:{s.ports[0]}/openapi.json"
        with urllib.request.urlopen(url, timeout=10) as r:
            spec = r.read().decode()
    return None if '"/v1/claims"' in spec else "trainfleet serve has no POST /v1/claims yet"


def plan(args: argparse.Namespace, tmp: Path) -> tuple[list[Arm], dict[str, str]]:
    """The arms to run, and the arms skipped with the reason."""
    chosen = set(args.arms.split(","))
    sizes = [int(n) for n in args.sizes.split(",")]
    skipped: dict[str, str] = {}

    def jobs(n: int) -> int:
        return min(args.jobs, 300) if n == 1 else args.jobs

    arms: list[Arm] = []
    for n in sizes:
        for k in range(args.pairs):
            if "reference" in chosen:
                arms.append(Arm("reference", n, jobs(n), pair=k))
            if "sqlite" in chosen:
                arms.append(Arm("trainfleet", n, jobs(n), pair=k))
    if "batched" in chosen:
        why = batch_supported(tmp)
        for k in range(args.pairs):
            arms.append(Arm("reference", args.batch_n, 2 * args.jobs, batch=args.batch, pair=k))
            if why is None:
                arms.append(
                    Arm("trainfleet", args.batch_n, 2 * args.jobs, batch=args.batch, pair=k)
                )
        if why is not None:
            skipped["trainfleet batched"] = why
    if chosen & {"postgresql", "two", "pgbatched"}:
        why = postgres_reachable(args.db)
        if why is not None:
            skipped["postgresql"] = f"no PostgreSQL at {args.db}: {why}"
        else:
            pg_jobs = min(args.jobs, args.pg_jobs)
            if "postgresql" in chosen:
                arms.append(Arm("trainfleet", args.pg_n, pg_jobs, db="postgresql"))
            if "two" in chosen:
                arms.append(Arm("trainfleet", args.pg_n, pg_jobs, db="postgresql", coordinators=2))
            if "pgbatched" in chosen and batch_supported(tmp) is None:
                arms.append(
                    Arm("trainfleet", args.batch_n, 2 * pg_jobs, db="postgresql", batch=args.batch)
                )
    if args.long:  # rounds of at least 100k jobs, each on a fresh server, each checked
        per_round = max(args.jobs, 100_000)
        rounds = math.ceil(1e6 / per_round)
        arms += [Arm("trainfleet", 64, per_round, long=True) for _ in range(rounds)]
    return arms, skipped


def guarded(what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one arm; a failure is recorded with its reason and the run goes on."""
    try:
        return fn()
    except Exception as err:
        traceback.print_exc()
        return {"arm": what, "failed": f"{type(err).__name__}: {err}"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp_name:
        tmp = Path(tmp_name)
        arms, skipped = plan(args, tmp)
        for i, arm in enumerate(arms):
            print(f"[{i + 1}/{len(arms)}] {arm.name} ({arm.jobs} jobs)", flush=True)
            path = tmp / f"arm{i}"
            results.append(
                guarded(arm.name, partial(run_arm, arm, path, seed=args.seed, pg_url=args.db))
            )
        if "fleet" in args.arms.split(","):
            print(
                f"[fleet] {args.fleet} workers heartbeating, 64 claiming ({args.fleet_on})",
                flush=True,
            )

            fleet = partial(
                run_fleet,
                tmp / "fleet",
                args.fleet,
                64,
                args.fleet_s,
                4 * args.jobs,
                db="postgresql" if args.fleet_on != "sqlite" else "sqlite",
                coordinators=2 if args.fleet_on == "two" else 1,
                pg_url=args.db,
            )
            results.append(guarded("fleet", fleet))
    result = {
        "benchmark": "queue",
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "env": environment(
            uvloop=package_version("uvloop"),
            httptools=package_version("httptools"),
            psycopg=package_version("psycopg"),
        ),
        "skipped": skipped,
        "arms": results,
        "goals": goals(results, long_mode=args.long),
        "anchors": ANCHORS,
        "metrics": flat_metrics(results),
    }
    with contextlib.suppress(OSError):
        write_result(result, args.out)
    print_table(result)
    print(f"(written to {args.out})")
    return result


def flat_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    """Named figures, one per arm and measure (the STYLE convention's flat metrics)."""
    keys = (
        "cycles_per_s",
        "claim_got_p50_ms",
        "claim_got_p99_ms",
        "claim_empty_p99_ms",
        "server_cpu_ms_per_cycle",
        "client_cpu_ms_per_request",
        "false_requeues",
    )
    out: dict[str, float] = {}
    for r in results:
        for k in keys:
            if isinstance(r.get(k), int | float):
                out[f"{r['arm']}_{k}"] = float(r[k])
        if "check" in r:
            out[f"{r['arm']}_violations"] = float(r["check"]["violations"])
    return out


if __name__ == "__main__":
    main()
