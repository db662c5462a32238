"""The claim's scan in-process, as the fleet arm loads it: does a claim's cost grow with the
pile of pending jobs no claimer can take?

    python -m bench.queue_scan [--fleet 400] [--claimers 64] [--cycles 10000]

The fleet arm's manifest (``bench.queue_fleet``): long jobs at priority 3 held by ``fleet``
workers on hosts h0..h99, then the usual mix of short jobs. ``claimers`` workers on their
own hosts claim and complete short jobs directly through the queue (no HTTP). The pinned
jobs (``allowed_hosts`` h0..h15, whose workers are all busy) and the jobs a claimer's host
denies stay pending at the head of the claim order. Printed: the mean CPU time of a claim
(``claim_many``, its transaction included) per slice of cycles; flat is the goal.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.queue_fleet import FLEET_HOSTS, fleet_jobs
from bench.queue_mix import capability, host_rules, manifest_toml
from trainfleet.capability.model import Capability
from trainfleet.manifest.load import parse_manifest
from trainfleet.queue.sqlite import SQLiteQueue


def run(tmp: Path, fleet: int, claimers: int, cycles: int, slice_n: int) -> list[float]:
    """Mean CPU ms per claim for each ``slice_n`` cycles."""
    queue = SQLiteQueue(tmp / "q.db")
    jobs = fleet_jobs(fleet, cycles * 2, seed=1)
    rules = host_rules(FLEET_HOSTS + claimers)
    queue.apply_manifest(parse_manifest(manifest_toml(jobs, rules), "fleet.toml"))
    for i in range(fleet):
        cap = Capability(**capability(i, f"h{i % FLEET_HOSTS}"))
        worker = queue.register_worker(cap)[0].id
        assert queue.claim(worker) is not None
    ids = [
        queue.register_worker(Capability(**capability(i, f"h{FLEET_HOSTS + i}")))[0].id
        for i in range(claimers)
    ]
    out: list[float] = []
    spent, n, done = 0.0, 0, 0
    while done < cycles:
        for worker in ids:
            t0 = time.thread_time()
            claim = queue.claim(worker)
            spent += time.thread_time() - t0
            n += 1
            if claim is None:
                continue
            queue.complete_plain(claim.job.id, worker, claim.epoch, {})
            done += 1
            if done % slice_n == 0:
                out.append(1000 * spent / n)
                spent, n = 0.0, 0
    queue.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fleet", type=int, default=400)
    p.add_argument("--claimers", type=int, default=64)
    p.add_argument("--cycles", type=int, default=10_000)
    p.add_argument("--slice", type=int, default=2_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        means = run(Path(tmp), args.fleet, args.claimers, args.cycles, args.slice)
    for i, ms in enumerate(means, 1):
        print(f"cycles {(i - 1) * args.slice:>6}-{i * args.slice:<6} claim {ms:.3f} ms of CPU")


if __name__ == "__main__":
    main()
