"""Chaos: randomized faults against a live fleet; does every job complete exactly once?

    python -m bench.chaos            (full: at least 200 injected faults, 4 workers)
    python -m bench.chaos --quick    (about 20 faults, 3 workers, a minute or two)

A live coordinator and real ``trainfleet join`` workers (``trainfleet.testing.LiveFleet``)
run a mixed workload of command jobs (``bench/chaos_job.py``: short ones, ones that fail
once, ones that print a lot, long ones that outlast the heartbeat timeout, and doomed ones
that must end "failed"), while a seeded random
schedule injects one fault at a time through the harness: a reply dropped after the
coordinator committed it (claim, heartbeat, complete, upload, fail), a delayed commit, the
daemon killed alone (a replacement worker then joins), the job killed alone, a partition
longer than the heartbeat timeout, SIGTERM while a claim is in flight, a full disk. Only
faults that took effect are counted.

Counted from the coordinator's job records and events and from the marker lines every
execution appends to a shared file: jobs completed exactly once; lost (never completed and
not legitimately failed); run twice at the same time (two executions of one job alive at
once); results lost (an execution ran to its end, yet no result and artifact landed).
Goal: 0, 0, 0 over at least 200 faults.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import RESULTS, environment, write_result
from trainfleet.testing import LiveFleet, WorkerHandle, disk_faults_unavailable

JOB_SCRIPT = Path(__file__).with_name("chaos_job.py")
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 3.0
TERMINAL = {"completed", "failed", "cancelled"}
FAILING = {"flaky", "doomed"}  # kinds whose attempts end in a `fail` report
KIND_WEIGHTS = {"short": 0.45, "long": 0.15, "flaky": 0.15, "chatty": 0.15, "doomed": 0.1}
# "long" jobs outlast the heartbeat timeout, so a copy orphaned by a dead or partitioned
# worker would still be running when the coordinator hands the job to another worker.


class Chaos:
    """One run: the fleet, the workload, the fault schedule, and what was injected."""

    def __init__(self, root: Path, fleet: LiveFleet, rng: random.Random, num_workers: int):
        self.root, self.fleet, self.rng = root, fleet, rng
        self.markers = root / "markers.jsonl"
        self.markers.touch()
        self.disk_mib = 64 if disk_faults_unavailable() is None else None
        self.jobs: dict[str, str] = {}  # name -> kind
        self.seconds: dict[str, float] = {}  # name -> how long it runs (fixed at creation)
        self.injected: Counter[str] = Counter()
        self.missed: Counter[str] = Counter()  # armed, but the moment never came
        self.unexpected_exits = 0
        self.workers: list[WorkerHandle] = [self._start(slot) for slot in range(num_workers)]
        self.faults: dict[str, Callable[[], bool]] = {
            # any worker: an idle one claims within its poll interval, a busy one after its job
            "drop_claim_reply": lambda: self._drop("POST", r"/claim$", busy=None),
            "drop_heartbeat_reply": lambda: self._drop("POST", r"/heartbeat$", busy=True),
            "drop_complete_reply": lambda: self._drop("POST", r"/complete$", busy=True),
            "drop_upload_reply": lambda: self._drop("PUT", r"/artifacts/", busy=True),
            "drop_fail_reply": lambda: self._drop("POST", r"/fail$", busy=True, kinds=FAILING),
            "delay_complete": lambda: self._delay(r"/complete$"),
            "delay_heartbeat": lambda: self._delay(r"/heartbeat$"),
            "kill_daemon": self._kill_daemon,
            "kill_job": self._kill_job,
            "partition": self._partition,
            "sigterm_during_claim": self._sigterm_during_claim,
        }
        if self.disk_mib is not None:
            self.faults["fill_disk"] = self._fill_disk

    # -- fleet and workload -------------------------------------------------------------
    def _start(self, slot: int) -> WorkerHandle:
        return self.fleet.start_worker(f"chaos-{slot}", disk_mib=self.disk_mib)

    def replace_dead_workers(self, expected: WorkerHandle | None = None) -> None:
        for slot, worker in enumerate(self.workers):
            if worker.poll() is not None:
                if worker is not expected:
                    self.unexpected_exits += 1
                    print(f"  worker {worker.host} exited by itself ({worker.returncode})")
                self.workers[slot] = self._start(slot)

    def top_up(self) -> None:
        counts = self.fleet.operator.status()["counts"]
        if counts.get("pending", 0) >= 2 * len(self.workers):
            return
        for _ in range(2 * len(self.workers) + 2):
            kinds, weights = zip(*KIND_WEIGHTS.items(), strict=True)
            name = f"c{len(self.jobs):04d}"
            self.jobs[name] = self.rng.choices(kinds, weights)[0]
            low, high = (4.0, 8.0) if self.jobs[name] == "long" else (0.5, 2.5)
            self.seconds[name] = round(self.rng.uniform(low, high), 2)
        self.fleet.reload(self.manifest())

    def manifest(self) -> str:
        out = []
        for name, kind in self.jobs.items():
            seconds = self.seconds[name] if kind != "chatty" else 0.5
            out.append(
                f'[[jobs]]\nname = "{name}"\nkind = "command"\n'
                f'command = ["{sys.executable}", "{JOB_SCRIPT}", "--name", "{name}",'
                f' "--kind", "{kind}", "--markers", "{self.markers}"]\n'
                f"hyper = {{ seconds = {seconds} }}\n"
                f"max_failures = {2 if kind == 'doomed' else 8}\ntimeout_s = 120\n"
            )
        return "".join(out)

    def _pick(self, busy: bool | None, kinds: set[str] | None = None) -> WorkerHandle | None:
        """A live worker: any (``busy`` None), idle, or busy (with a job of ``kinds``)."""
        alive = [w for w in self.workers if w.poll() is None]
        if busy is None:
            return self.rng.choice(alive) if alive else None
        fitting = [w for w in alive if bool(w.job_pids()) == busy]
        if kinds is not None:
            fitting = [w for w in fitting if any(self.jobs.get(n) in kinds for n in w.job_names())]
        return self.rng.choice(fitting) if fitting else None

    # -- faults -------------------------------------------------------------------------
    def inject(self, name: str) -> bool:
        took = self.faults[name]()
        (self.injected if took else self.missed)[name] += 1
        return took

    def _drop(
        self, method: str, path: str, busy: bool | None, kinds: set[str] | None = None
    ) -> bool:
        worker = self._pick(busy, kinds)
        if worker is None or worker.proxy is None:
            return False
        before = len(worker.proxy.seen(method, path, fault="dropped"))
        worker.proxy.drop_reply(method, path, times=1)
        return self._fired(worker, method, path, "dropped", before, timeout_s=6.0)

    def _delay(self, path: str) -> bool:
        worker = self._pick(busy=True)
        if worker is None or worker.proxy is None:
            return False
        seconds = round(self.rng.uniform(0.5, 2 * HEARTBEAT_TIMEOUT_S), 2)
        before = len(worker.proxy.seen("POST", path, fault="delayed"))
        worker.proxy.delay("POST", path, seconds=seconds, times=1)
        return self._fired(worker, "POST", path, "delayed", before, timeout_s=seconds + 6.0)

    def _fired(
        self,
        worker: WorkerHandle,
        method: str,
        path: str,
        fault: str,
        before: int,
        timeout_s: float,
    ) -> bool:
        assert worker.proxy is not None
        try:
            worker.proxy.wait_for(method, path, timeout_s, count=before + 1, fault=fault)
            return True
        except AssertionError:
            worker.proxy.clear()
            return False

    def _kill_daemon(self) -> bool:
        worker = self._pick(busy=True) or self._pick(busy=None)
        if worker is None:
            return False
        worker.kill_daemon()
        self.replace_dead_workers(expected=worker)
        return True

    def _kill_job(self) -> bool:
        worker = self._pick(busy=True)
        return worker is not None and bool(worker.kill_job())

    def _partition(self) -> bool:
        worker = self._pick(busy=True)
        if worker is None or worker.proxy is None:
            return False
        worker.proxy.partition()
        time.sleep(HEARTBEAT_TIMEOUT_S + 1.5)
        worker.proxy.heal()
        return True

    def _sigterm_during_claim(self) -> bool:
        worker = self._pick(busy=False) or self._pick(busy=None)
        if worker is None:
            return False
        try:  # an idle worker claims within its poll interval, a busy one after its job
            worker.sigterm_during("POST", r"/claim$", hold_s=1.0, timeout_s=8.0)
        except AssertionError:
            return False
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            print(f"  worker {worker.host} ignored SIGTERM for 30 s; killed")
            worker.kill_daemon()
        self.replace_dead_workers(expected=worker)
        return True

    def _fill_disk(self) -> bool:
        worker = self._pick(busy=True)
        if worker is None or worker.disk is None:
            return False
        worker.fill_disk()
        time.sleep(2.0)
        worker.free_disk()
        return True

    def settle(self) -> None:
        for worker in self.workers:
            if worker.proxy is not None:
                worker.proxy.clear()
                worker.proxy.heal()
            worker.free_disk()
        self.replace_dead_workers()


def analyse(chaos: Chaos) -> tuple[dict[str, int], dict[str, Any]]:
    """Count outcomes per job from the coordinator's records and the execution markers."""
    details = {name: chaos.fleet.job(name) for name in chaos.jobs}
    rows = []
    for line in chaos.markers.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    problems: dict[str, Any] = {}
    counts = count_outcomes(chaos.jobs, rows, details, chaos.fleet.coord.store.exists, problems)
    return counts, problems


def count_outcomes(
    jobs: dict[str, str],
    markers: list[dict[str, Any]],
    details: dict[str, dict[str, Any]],
    stored: Callable[[str], bool],
    problems: dict[str, Any] | None = None,
) -> dict[str, int]:
    """``jobs``: name -> kind; ``markers``: the rows executions wrote; ``details``: name ->
    the coordinator's ``GET /v1/jobs/{name}`` (job, events, artifacts); ``stored``: whether
    the artifact store holds a digest. ``problems`` (if given) gets, for each job that
    missed the goal, what went wrong and its record, to investigate."""
    runs: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in markers:
        run = runs[row["job"]].setdefault(
            row["run"], {"first": row["t"], "last": row["t"], "ended": False}
        )
        run["first"], run["last"] = min(run["first"], row["t"]), max(run["last"], row["t"])
        run["ended"] = run["ended"] or row["ev"] == "end"
    counts: Counter[str] = Counter()
    for name, kind in jobs.items():
        job, events = details[name]["job"], details[name]["events"]
        completions = sum(e["kind"] == "completed" for e in events)
        executions = sorted(runs[name].values(), key=lambda r: r["first"])
        ended = {run_id for run_id, r in runs[name].items() if r["ended"]}
        counts["executions"] += len(executions)
        counts["jobs"] += 1
        counts["stuck"] += job["state"] not in TERMINAL
        if kind == "doomed":
            counts["expected_failed"] += 1
            counts["lost"] += job["state"] != "failed"
        else:
            counts["expected_completed"] += 1
            counts["lost"] += job["state"] != "completed"
            counts["exactly_once"] += job["state"] == "completed" and completions == 1
        counts["completed_more_than_once"] += completions > 1
        latest_end, overlapped = 0.0, False
        for r in executions:  # alive at once: one started before another's last sign of life
            overlapped = overlapped or r["first"] < latest_end
            latest_end = max(latest_end, r["last"])
        counts["run_twice_at_once"] += overlapped
        wrong = []
        if job["state"] != ("failed" if kind == "doomed" else "completed"):
            wrong.append("lost")
        if overlapped:
            wrong.append("run twice at once")
        if completions > 1:
            wrong.append("completed more than once")
        if ended:
            result = job.get("result") or {}
            sha = result.get("artifact")
            landed = (
                job["state"] == "completed"
                and (result.get("metrics") or {}).get("run") in ended
                and sha in [a["sha256"] for a in details[name]["artifacts"]]
                and stored(sha)
            )
            counts["results_lost"] += not landed
            counts["executions_discarded"] += len(ended) - (1 if landed else 0)
            if not landed:
                wrong.append("result lost")
        if wrong and problems is not None:
            problems[name] = {
                "kind": kind,
                "problems": wrong,
                "state": job["state"],
                "error": job.get("error"),
                "num_failures": job.get("num_failures"),
                "events": [f"{e['kind']}: {e.get('detail') or ''}"[:200] for e in events],
                "executions": executions,
            }
    return dict(counts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="trainfleet-chaos-") as tmp,
        LiveFleet(
            Path(tmp),
            heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
            heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
            reap_interval_s=0.25,
        ) as fleet,
    ):
        chaos = Chaos(Path(tmp), fleet, rng, args.workers)
        deadline = started + args.max_minutes * 60
        names = sorted(chaos.faults)
        round_no = 0
        while sum(chaos.injected.values()) < args.faults and time.monotonic() < deadline:
            round_no += 1
            chaos.top_up()
            name = rng.choice(names)
            took = chaos.inject(name)
            print(f"round {round_no:4d}  {name:<22} {'injected' if took else 'no occasion'}")
            chaos.replace_dead_workers()
            time.sleep(rng.uniform(0.2, 1.0))
        chaos.settle()
        drain_deadline = time.monotonic() + args.drain_s
        while time.monotonic() < drain_deadline:
            states = {j["state"] for j in fleet.operator.jobs()}
            if states <= TERMINAL:
                break
            chaos.replace_dead_workers()
            time.sleep(0.5)
        counts, problems = analyse(chaos)
        injected, missed, exits = chaos.injected, chaos.missed, chaos.unexpected_exits
        disk = "available" if chaos.disk_mib else f"skipped: {disk_faults_unavailable()}"
    metrics: dict[str, Any] = {
        "faults_injected": sum(injected.values()),
        "faults_armed_without_occasion": sum(missed.values()),
        **{f"faults_{name}": injected[name] for name in sorted(chaos.faults)},
        "jobs_total": counts.get("jobs", 0),
        "jobs_expected_to_complete": counts.get("expected_completed", 0),
        "jobs_expected_to_fail": counts.get("expected_failed", 0),
        "jobs_completed_exactly_once": counts.get("exactly_once", 0),
        "jobs_lost": counts.get("lost", 0),
        "jobs_run_twice_at_once": counts.get("run_twice_at_once", 0),
        "jobs_results_lost": counts.get("results_lost", 0),
        "jobs_completed_more_than_once": counts.get("completed_more_than_once", 0),
        "jobs_not_terminal_at_end": counts.get("stuck", 0),
        "executions_total": counts.get("executions", 0),
        "executions_finished_but_discarded": counts.get("executions_discarded", 0),
        "workers_exited_unexpectedly": exits,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    metrics["goal_met"] = (
        metrics["jobs_lost"] == 0
        and metrics["jobs_run_twice_at_once"] == 0
        and metrics["jobs_results_lost"] == 0
        and metrics["faults_injected"] >= args.faults
    )
    return {
        "benchmark": "chaos",
        "params": {
            "quick": args.quick,
            "seed": args.seed,
            "faults_target": args.faults,
            "workers": args.workers,
            "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
            "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
            "job_mix": KIND_WEIGHTS,
            "disk_faults": disk,
        },
        "env": environment(),
        "metrics": metrics,
        "problems": problems,  # per job that missed the goal: what, and its record
    }


def print_table(result: dict[str, Any], out: Path) -> None:
    m = result["metrics"]
    rows = [
        (
            "faults injected (took effect)",
            m["faults_injected"],
            f">= {result['params']['faults_target']}",
        ),
        ("jobs", m["jobs_total"], ""),
        (
            "jobs completed exactly once",
            m["jobs_completed_exactly_once"],
            str(m["jobs_expected_to_complete"]),
        ),
        ("jobs lost", m["jobs_lost"], "0"),
        ("jobs run twice at the same time", m["jobs_run_twice_at_once"], "0"),
        ("jobs whose finished result did not land", m["jobs_results_lost"], "0"),
        ("jobs completed more than once", m["jobs_completed_more_than_once"], "0"),
        ("jobs not terminal at the end", m["jobs_not_terminal_at_end"], "0"),
        ("workers that exited by themselves", m["workers_exited_unexpectedly"], "0"),
    ]
    print(f"\n{'measure':<45} {'ours':>8} {'goal':>8}")
    for name, value, goal in rows:
        print(f"{name:<45} {value:>8} {goal:>8}")
    faults = {k.removeprefix("faults_"): v for k, v in m.items() if k.startswith("faults_")}
    print("faults by kind: " + ", ".join(f"{k} {v}" for k, v in faults.items()))
    for name, problem in result["problems"].items():
        what = ", ".join(problem["problems"])
        print(f"  {name} ({problem['kind']}): {what}; ends {problem['state']}: {problem['error']}")
        print(f"    events: {' | '.join(problem['events'])}")
    print(f"goal met: {m['goal_met']}   (written to {out}, {m['elapsed_s']} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 20 faults, 3 workers")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--faults", type=int, help="faults to inject (default 200; quick 20)")
    parser.add_argument("--workers", type=int, help="worker processes (default 4; quick 3)")
    parser.add_argument("--max-minutes", type=float, help="stop injecting after this long")
    parser.add_argument("--drain-s", type=float, default=90.0, help="wait for jobs to end")
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    args = parser.parse_args(argv)
    args.faults = args.faults or (20 if args.quick else 200)
    args.workers = args.workers or (3 if args.quick else 4)
    args.max_minutes = args.max_minutes or (2.0 if args.quick else 40.0)
    result = run(args)
    write_result(result, args.out)
    print_table(result, args.out)


if __name__ == "__main__":
    main()
