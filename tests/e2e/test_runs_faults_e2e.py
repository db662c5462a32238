"""End to end, collaborative runs under faults (DiLoCo: Douillard et al. 2023, arXiv
2311.08105): the coordinator SIGKILLed mid-run and restarted on its state directory, a
replica's worker killed mid-round, a worker partitioned from the coordinator during a round,
and a run whose tasks are data-parallel gangs. Live processes throughout: ``trainfleet join``
workers behind fault proxies; the coordinator in-process (``fleet``) or, where it must be
killed, a ``trainfleet serve`` process (``ServedFleet``). Tiny runs: 1-layer GPT, d_model 16.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_runs_e2e import completed, run_toml, wait_run, worker_ids

from livefleet import Fleet, wait_until
from trainfleet.testing import LiveFleet, ServedFleet, WorkerHandle

pytestmark = pytest.mark.slow

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def replica_jobs(fleet: LiveFleet) -> list[dict[str, Any]]:
    return [j for j in fleet.operator.jobs() if j["name"].startswith("collab.r")]


def running_replica(worker: WorkerHandle) -> str | None:
    """The name of a replica task this worker's job process runs now, if any."""
    return next((n for n in worker.job_names() if n.startswith("collab.r")), None)


def event_kinds(fleet: LiveFleet, job: str) -> list[str]:
    return [e["kind"] for e in fleet.job(job)["events"]]


def round_of(job_name: str) -> int:
    return int(job_name.split(".")[1][1:])


def check_bookkeeping(detail: dict[str, Any], num_rounds: int) -> None:
    """Every round closed once, in order, each starting from the last one's weights; every
    contribution recorded once and applied at most once, as the rounds' figures say."""
    rounds = detail["rounds"]
    assert [r["round"] for r in rounds] == list(range(num_rounds))
    assert all(r["state"] == "closed" and r["closed_at"] is not None for r in rounds)
    for before, after in itertools.pairwise(rounds):
        assert after["weights"] == before["next_weights"]
    assert detail["run"]["weights"] == rounds[-1]["next_weights"]
    contribs = detail["contributions"]
    attempts = Counter((c["job_id"], c["epoch"]) for c in contribs)
    assert max(attempts.values()) == 1  # one row per completed attempt
    applied = [c for c in contribs if c["status"] == "applied"]
    assert all(c["applied_in_round"] is not None for c in applied)
    assert all(c["applied_in_round"] is None for c in contribs if c["status"] != "applied")
    slots = Counter((c["round"], c["replica"]) for c in applied)
    assert not slots or max(slots.values()) == 1  # a slot's pseudo-gradient applies once
    for r in rounds:
        here = [c for c in applied if c["applied_in_round"] == r["round"]]
        assert len(here) == r["accepted"] + r["late_applied"], r
        assert all(0 <= r["round"] - c["round"] <= 1 for c in here)  # max_staleness 1


def test_a_coordinator_killed_mid_run_resumes_from_its_state_dir(tmp_path: Path) -> None:
    with ServedFleet(tmp_path) as fleet:
        fleet.reload(run_toml(rounds=2, min_quorum=2))  # a round waits for both replicas
        fleet.start_worker("cpu-a")
        b = fleet.start_worker("cpu-b")

        # Hold cpu-b's replica of a round past the first back (partitioned), so that round
        # sits open with cpu-a's contribution accepted and not yet applied when the
        # coordinator dies: the new process resumes from stored weights and momentum.
        def later_replica() -> str | None:
            name = running_replica(b)
            return name if name is not None and round_of(name) >= 1 else None

        held = wait_until(later_replica, 240, "cpu-b to run a replica of round 1+", interval_s=0.05)
        assert b.proxy is not None
        b.proxy.partition()
        r = round_of(held)

        def pending(d: dict[str, Any]) -> bool:
            accepted = [c for c in d["contributions"] if c["status"] == "accepted"]
            return d["rounds"][r]["state"] == "open" and any(c["round"] == r for c in accepted)

        before = wait_run(fleet, f"an accepted, unapplied contribution of round {r}", pending, 120)
        fleet.kill_coordinator()
        accepted = {
            (c["job_id"], c["epoch"]): c
            for c in before["contributions"]
            if c["status"] in ("accepted", "applied")
        }
        b.proxy.heal()
        fleet.start_coordinator()
        detail = completed(fleet, 300)

    assert fleet.starts == 2
    check_bookkeeping(detail, 2)
    after = {(c["job_id"], c["epoch"]): c for c in detail["contributions"]}
    for key, c in accepted.items():  # nothing accepted before the kill was lost
        assert after[key]["status"] == "applied", after[key]
        assert after[key]["applied_in_round"] >= c["round"]
    assert any(c["status"] == "accepted" and c["round"] == r for c in accepted.values())
    # No round was closed twice, by the killed process or its successor.
    closes = Counter(re.findall(r"run collab round (\d+) closed", fleet.server_log_text()))
    assert set(closes) <= {"0", "1"} and max(closes.values()) == 1, closes


def test_a_run_of_gangs_finishes_and_improves(fleet: Fleet) -> None:
    fleet.reload(run_toml(rounds=2, gang_size=2))  # two gloo ranks inside every task
    fleet.start_worker("cpu-a")
    fleet.start_worker("cpu-b")
    detail = completed(fleet, 400)

    check_bookkeeping(detail, 2)
    rounds = detail["rounds"]
    assert rounds[-1]["heldout_loss"] < rounds[0]["heldout_loss"]
    results = [j["result"] for j in replica_jobs(fleet) if j["state"] == "completed"]
    assert len(results) >= 3
    for result in results:
        metrics = result["metrics"]
        assert metrics["gang_size"] == 2
        assert metrics["tokens"] == metrics["inner_steps_done"] * 4 * 16 * 2  # batch x seq x g


def test_every_replica_of_a_round_starts_from_the_same_bytes(fleet: Fleet) -> None:
    fleet.reload(run_toml(rounds=2, min_quorum=2))
    victim = fleet.start_worker("cpu-a")
    fleet.start_worker("cpu-b")
    killed = wait_until(
        lambda: running_replica(victim), 240, "cpu-a to run a replica", interval_s=0.05
    )
    victim.kill_daemon()  # mid-round: the task is requeued and run again elsewhere
    fleet.start_worker("cpu-c")
    detail = completed(fleet, 300)

    check_bookkeeping(detail, 2)
    starts = {r["round"]: (r["weights"], r["weights_size"]) for r in detail["rounds"]}
    for sha, _ in starts.values():  # the coordinator's blobs are what they are named
        assert hashlib.sha256(fleet.coord.store.read_bytes(sha)).hexdigest() == sha
    jobs = replica_jobs(fleet)
    assert {j["name"] for j in jobs} >= {f"collab.r{r}.k{k}" for r in range(2) for k in (0, 1)}
    for job in jobs:  # every task of round r names round r's start weights
        task = job["spec"]["task"]
        assert (task["weights"], task["weights_size"]) == starts[task["round"]], job["name"]
    redo = fleet.job(killed)["job"]
    assert redo["state"] == "completed" and redo["attempt"] >= 2

    # What each worker fetched (killed one included) hashes to the digest it is filed under,
    # which is a round's start weights: every replica started from byte-identical weights.
    fetched: dict[str, set[str]] = {}
    for worker in fleet.workers:
        cache = worker.workdir / "cache" / "weights"
        for path in cache.glob("*.safetensors"):
            sha = path.name.split(".")[0]
            if HEX64.match(sha):
                assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, path
                fetched.setdefault(worker.host, set()).add(sha)
    assert set().union(*fetched.values()) <= {sha for sha, _ in starts.values()}
    killed_start = starts[round_of(killed)][0]
    assert killed_start in fetched["cpu-a"]  # the killed attempt's bytes were the round's
    redone_by = {w["host"] for w in fleet.operator.workers() if w["id"] == redo["worker_id"]}
    assert redone_by and all(killed_start in fetched[h] for h in redone_by)


@pytest.mark.parametrize(
    "lease_s",
    [
        pytest.param(30.0, id="healed-within-the-lease-late-result"),
        pytest.param(3.0, id="partitioned-past-the-lease-fenced"),
    ],
)
def test_a_partitioned_worker_neither_holds_up_the_round_nor_applies_twice(
    tmp_path: Path, lease_s: float
) -> None:
    with LiveFleet(tmp_path, heartbeat_timeout_s=lease_s) as fleet:
        fleet.reload(run_toml(rounds=3, min_quorum=1, straggler_wait=0.25))
        fleet.start_worker("cpu-a")
        victim = fleet.start_worker("cpu-b")
        cut = wait_until(
            lambda: running_replica(victim), 240, "cpu-b to run a replica", interval_s=0.05
        )
        assert victim.proxy is not None
        victim.proxy.partition()
        r = round_of(cut)
        victims = worker_ids(fleet, "cpu-b")
        job_id = fleet.job(cut)["job"]["id"]

        closed = wait_run(
            fleet, f"round {r} to close", lambda d: d["rounds"][r]["state"] == "closed", 120
        )
        # It closed on quorum, without the partitioned worker, which is still cut off.
        assert victim.proxy.partitioned
        rnd = closed["rounds"][r]
        assert rnd["accepted"] >= 1 and rnd["quorum_at"] is not None
        # (Past a short lease the slot may already be re-run by cpu-a: that one may count.)
        assert not [
            c
            for c in closed["contributions"]
            if c["job_id"] == job_id and c["worker_id"] in victims
        ]
        if lease_s > 3:  # the replica finishes while cut off; its worker holds the result
            wait_until(lambda: not victim.job_names(), 120, "cpu-b's replica to finish")
        else:  # cut off past the lease: the coordinator writes the attempt off
            wait_until(lambda: "lost" in event_kinds(fleet, job_id), 60, f"{cut} to be lost")
        victim.proxy.heal()
        detail = completed(fleet, 300)
        events = event_kinds(fleet, job_id)

    check_bookkeeping(detail, 3)
    late = [
        c for c in detail["contributions"] if c["job_id"] == job_id and c["worker_id"] in victims
    ]
    if lease_s > 3:
        # The late result arrived once: applied one round late (damped), or dropped if even
        # later than max_staleness allows (or after the run ended); never applied twice.
        assert len(late) == 1, late
        (c,) = late
        if c["status"] == "applied":
            assert (c["staleness"], c["applied_in_round"]) == (1, r + 1), c
        else:
            assert c["status"] == "dropped" and (c["staleness"] > 1 or r == 2), c
    else:
        # The lease ran out while cut off: the attempt was written off (and its worker
        # stopped it), so it never reported; the slot was re-run or cancelled, applied once.
        assert late == [] and "lost" in events, (late, events)
    ours = [c for c in detail["contributions"] if c["job_id"] == job_id]
    assert sum(c["status"] == "applied" for c in ours) <= 1
