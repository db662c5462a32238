"""Goodput of a collaborative DiLoCo run under churn, on a live fleet.

    python -m bench.diloco_churn            (full: a few minutes on 2 cores)
    python -m bench.diloco_churn --quick    (about two minutes)

A real coordinator (``trainfleet.testing.LiveFleet``, in this process) and real ``trainfleet
join`` workers (one thread each) run one ``[[runs]]`` entry: 4 replicas of the bench's byte
GPT (2 layers, width 64) on the synthetic dialect mixture (its exact loss floor is printed).
Every ``kill_every`` rounds the bench destroys, half a typical round after the round opened,
a worker running one of its replicas (daemon and job, as a machine dying) and starts a
newcomer. From the run's own records (``GET /v1/runs/{run}``):

- goodput: compute seconds of applied contributions / compute seconds of every contribution
  reported, plus an upper bound on what each kill destroyed (kill time - the killed task's
  round opening);
- survivors' stall per kill: a round with a kill's wall time minus the median wall time of
  rounds without one;
- the newcomer's discarded inner steps (its contributions that were refused or dropped), and
  the rounds from its start to its first applied contribution.

torchft's figures are not measured here: its quorum is per step inside one training job,
not a queue of tasks, so there is no equal run to put beside this one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import RESULTS, environment, write_result
from trainfleet.data.dialects import documents_floor_nats
from trainfleet.data.shards import plan_shards
from trainfleet.data.spec import SyntheticDataset
from trainfleet.testing import LiveFleet

STARTED = time.perf_counter()
RUN = "churn"
DEADLINE_S = 900
HYPER = (
    "n_layers = 2, d_model = 64, n_heads = 4, seq_len = 64, batch_size = 8, lr = 3e-3,"
    " warmup_steps = 10, eval_batches = 8"
)


@dataclass(frozen=True)
class Sizes:
    workers: int
    replicas: int
    inner_steps: int
    rounds: int
    kill_every: int

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        return cls(4, 4, 20, 6, 2) if quick else cls(5, 4, 200, 12, 3)


def say(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def dataset() -> SyntheticDataset:
    return SyntheticDataset(
        name="syn", source="synthetic", num_documents=400, doc_tokens=256, shard_tokens=4096
    )


def manifest(sizes: Sizes) -> str:
    return f"""
[datasets.syn]
source = "synthetic"
num_documents = 400
doc_tokens = 256
shard_tokens = 4096

[[runs]]
name = "{RUN}"
dataset = "syn"
replicas = {sizes.replicas}
inner_steps = {sizes.inner_steps}
rounds = {sizes.rounds}
hyper = {{ {HYPER} }}
"""


def detail(fleet: LiveFleet) -> dict[str, Any]:
    result: dict[str, Any] = fleet.operator.run(RUN)
    return result


def churn(sizes: Sizes, tmp: Path) -> dict[str, Any]:
    kills: list[dict[str, Any]] = []
    newcomers: dict[str, float] = {}  # host -> start time
    with LiveFleet(tmp) as fleet:
        fleet.reload(manifest(sizes))
        workers = [fleet.start_worker(f"cpu-{i}") for i in range(sizes.workers)]
        next_kill = sizes.kill_every
        deadline = time.monotonic() + DEADLINE_S
        while (d := detail(fleet))["run"]["state"] != "completed":
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {RUN} not completed in {DEADLINE_S} s: {d['run']}")
            current = d["run"]["round"]
            walls = [r["wall_s"] for r in d["rounds"] if r["wall_s"]]
            opened = max((r["opened_at"] for r in d["rounds"]), default=time.time())
            # kill mid-round: half a typical round after it opened
            mid = time.time() >= opened + 0.5 * (statistics.median(walls) if walls else 0)
            if current >= next_kill and current < sizes.rounds - 1 and mid:
                prefix = f"{RUN}.r{current}."
                victim = next(
                    (w for w in workers if any(n.startswith(prefix) for n in w.job_names())),
                    None,
                )
                if victim is not None:
                    jobs = [n for n in victim.job_names() if n.startswith(f"{RUN}.r")]
                    say(f"round {current}: destroying {victim.host} (running {jobs})")
                    kills.append(
                        {"round": current, "time": time.time(), "host": victim.host, "jobs": jobs}
                    )
                    victim.destroy()
                    workers.remove(victim)
                    host = f"cpu-{len(kills) + sizes.workers - 1}-new"
                    newcomers[host] = time.time()
                    workers.append(fleet.start_worker(host))
                    next_kill += sizes.kill_every
            threading.Event().wait(0.1)
        final = detail(fleet)
        hosts = {w["id"]: w["host"] for w in fleet.operator.workers()}
    return measure(final, kills, newcomers, hosts)


def measure(
    d: dict[str, Any],
    kills: list[dict[str, Any]],
    newcomers: dict[str, float],
    hosts: dict[str, str],
) -> dict[str, Any]:
    rounds = {r["round"]: r for r in d["rounds"]}
    contribs = d["contributions"]
    applied_s = sum(c["compute_s"] or 0 for c in contribs if c["status"] == "applied")
    reported_s = sum(c["compute_s"] or 0 for c in contribs)
    killed_s = 0.0
    for k in kills:
        for job in k["jobs"]:
            task_round = int(job.split(".")[1][1:])
            killed_s += max(0.0, k["time"] - rounds[task_round]["opened_at"])
    kill_rounds = {k["round"] for k in kills}
    calm = [r["wall_s"] for n, r in rounds.items() if n not in kill_rounds and r["wall_s"]]
    calm_median = statistics.median(calm) if calm else float("nan")
    stalls = [rounds[n]["wall_s"] - calm_median for n in sorted(kill_rounds) if n in rounds]
    new_ids = {i for i, h in hosts.items() if h in newcomers}
    mine = [c for c in contribs if c["worker_id"] in new_ids]
    discarded = sum(c["inner_steps_done"] for c in mine if c["status"] in ("refused", "dropped"))
    first_applied = [
        min(
            (
                c["applied_in_round"]
                for c in mine
                if c["status"] == "applied" and hosts[c["worker_id"]] == h
            ),
            default=None,
        )
        for h in newcomers
    ]
    losses = [r["heldout_loss"] for r in d["rounds"] if r["heldout_loss"] is not None]
    return {
        "rounds": len(rounds),
        "kills": len(kills),
        "newcomers": len(newcomers),
        "applied_compute_s": applied_s,
        "reported_compute_s": reported_s,
        "killed_compute_s_upper_bound": killed_s,
        "goodput": applied_s / (reported_s + killed_s) if reported_s + killed_s else None,
        "goodput_reported_only": applied_s / reported_s if reported_s else None,
        "contributions_applied": sum(c["status"] == "applied" for c in contribs),
        "contributions_refused": sum(c["status"] == "refused" for c in contribs),
        "contributions_dropped": sum(c["status"] == "dropped" for c in contribs),
        "late_applied": sum(r["late_applied"] for r in d["rounds"]),
        "round_wall_s_median_calm": calm_median,
        "stall_s_per_kill_mean": statistics.mean(stalls) if stalls else None,
        "stall_s_per_kill_max": max(stalls) if stalls else None,
        "newcomer_discarded_inner_steps": discarded,
        "newcomer_contributions_applied": sum(c["status"] == "applied" for c in mine),
        "newcomer_first_applied_round_max": max(
            (r for r in first_applied if r is not None), default=None
        ),
        "heldout_loss_first": losses[0] if losses else None,
        "heldout_loss_last": losses[-1] if losses else None,
        "bytes_up": sum(r["bytes_up"] for r in d["rounds"]),
        "bytes_down": sum(r["bytes_down"] for r in d["rounds"]),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and workers")
    parser.add_argument("--out", type=Path, default=RESULTS / "diloco_churn.json")
    args = parser.parse_args(argv)
    sizes = Sizes.pick(args.quick)
    spec = dataset()
    plan = plan_shards(spec)
    floor = documents_floor_nats(
        spec, [i for s in plan.shards if s.split == "train" for i in s.doc_indices()]
    )
    say(f"synthetic mixture: exact loss floor {floor:.4f} nats/token")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = churn(sizes, Path(tmp))
    metrics["loss_floor_nats"] = floor
    result = {
        "benchmark": "diloco_churn",
        "params": {"quick": args.quick, **asdict(sizes), "dataset": spec.model_dump()},
        "env": environment(),
        "metrics": metrics,
    }
    write_result(result, args.out)
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}} | {v:,.4f}" if isinstance(v, float) else f"{k:<{width}} | {v}")
    print(f"(written to {args.out})")
    return result


if __name__ == "__main__":
    main()
