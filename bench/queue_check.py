"""Invariant checks of a bench.queue run, read from the database and its event log afterwards.

Every arm ends with these, on the rows the server wrote (the real coordinator's or the
reference server's: both keep ``jobs``, ``workers`` and ``events`` with the same columns):

- double claim: a job claimed while an earlier claim of it was still held, or an epoch
  handed out twice;
- constraint or host policy violation: a claim by a worker whose effective capability,
  host deny rules or the job's ``allowed_hosts`` rule it out (``queue_mix.fits``, written
  independently of trainfleet's matcher);
- priority inversion: a job claimed while a higher-priority job that the same worker could
  run was pending. Events are replayed in commit order (SQLite's single writer); with
  several writers (PostgreSQL) an event's sequence number is taken before commit, so
  ``grace_s`` tolerates a higher job that another claim was taking at that moment (it must
  have been claimed within ``grace_s``);
- every job completed exactly once (one ``completed`` event, final state ``completed``);
- no healthy job requeued: no workers die in the bench, so every attempt that left
  claimed/running for anything but completed is a false requeue.
"""

from __future__ import annotations

import heapq
import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from bench.queue_mix import HostRule, JobReq, effective, fits

ACTIVE = ("claimed", "running")


@dataclass
class Report:
    """Counts of each violation, with a few examples of each."""

    claims: int = 0
    double_claims: int = 0
    policy_violations: int = 0
    priority_inversions: int = 0
    not_completed_once: int = 0
    false_requeues: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def violations(self) -> int:
        return (
            self.double_claims
            + self.policy_violations
            + self.priority_inversions
            + self.not_completed_once
            + self.false_requeues
        )

    def note(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "claims": self.claims,
            "double_claims": self.double_claims,
            "policy_violations": self.policy_violations,
            "priority_inversions": self.priority_inversions,
            "not_completed_once": self.not_completed_once,
            "false_requeues": self.false_requeues,
            "violations": self.violations,
            "examples": self.examples,
        }


def fetch(db: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` from a SQLite file path or a postgresql:// URL."""
    if db.startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(db) as pg:
            return [tuple(r) for r in pg.execute(sql).fetchall()]
    lite = sqlite3.connect(db)
    try:
        return lite.execute(sql).fetchall()
    finally:
        lite.close()


def check(
    db: str,
    jobs: Iterable[JobReq],
    rules: dict[str, HostRule],
    *,
    grace_s: float | None = None,
    require_all_completed: bool = True,
) -> Report:
    """Check the run stored in ``db`` against the seeded ``jobs`` and host ``rules``."""
    by_name = {j.name: j for j in jobs}
    names = {jid: name for jid, name, _ in fetch(db, "SELECT id, name, state FROM jobs")}
    final = {jid: state for jid, _, state in fetch(db, "SELECT id, name, state FROM jobs")}
    workers = {
        wid: (host, json.loads(cap))
        for wid, host, cap in fetch(db, "SELECT id, host, capability FROM workers")
    }
    events = fetch(
        db,
        "SELECT seq, job_id, at, kind, from_state, to_state, worker_id, epoch"
        " FROM events ORDER BY seq",
    )
    return replay(events, names, final, by_name, workers, rules, grace_s, require_all_completed)


def replay(
    events: list[tuple[Any, ...]],
    names: dict[str, str],
    final: dict[str, str],
    by_name: dict[str, JobReq],
    workers: dict[str, tuple[str, dict[str, Any]]],
    rules: dict[str, HostRule],
    grace_s: float | None,
    require_all_completed: bool,
) -> Report:
    report = Report()
    patterns = sorted({p for r in rules.values() for p in r.deny_jobs})

    def group(job: JobReq) -> tuple[Any, ...]:
        # Jobs alike in everything a fit depends on share one pending set.
        denied = tuple(fnmatchcase(job.name, p) for p in patterns)
        return (
            job.require_cuda,
            job.min_vram_gib,
            job.min_ram_gib,
            job.min_cores,
            job.allowed_hosts,
            denied,
        )

    ours = {jid: by_name[n] for jid, n in names.items() if n in by_name}
    priorities = sorted({j.priority for j in ours.values()})
    next_claim_at = _next_claim_times(events)
    # pending[(priority, group)] = heap of (-next claim time, event index, job id), lazily cleaned
    pending: dict[tuple[int, tuple[Any, ...]], list[tuple[float, int, str]]] = defaultdict(list)
    example: dict[tuple[Any, ...], JobReq] = {}
    is_pending: dict[str, int] = {}  # job id -> index of the event that made it pending

    def make_pending(jid: str, index: int) -> None:
        job = ours[jid]
        key = (job.priority, group(job))
        example[key[1]] = job
        is_pending[jid] = index
        heapq.heappush(pending[key], (-next_claim_at.get((jid, index), float("inf")), index, jid))

    for jid in ours:
        make_pending(jid, -1)
    holder: dict[str, tuple[str, int]] = {}
    last_epoch: dict[str, int] = {}
    completions: dict[str, int] = defaultdict(int)
    for index, (_seq, jid, at, kind, frm, to, wid, epoch) in enumerate(events):
        job = ours.get(jid)
        if job is None:
            continue
        if to == "claimed":
            report.claims += 1
            if jid in holder or (epoch is not None and epoch <= last_epoch.get(jid, 0)):
                report.double_claims += 1
                report.note(
                    f"double claim: {job.name} by {wid} at epoch {epoch}"
                    f" while held by {holder.get(jid)}"
                )
            holder[jid] = (wid, epoch)
            last_epoch[jid] = max(epoch or 0, last_epoch.get(jid, 0))
            is_pending.pop(jid, None)
            host, cap = workers.get(wid, ("?", {}))
            rule = rules.get(host)
            eff = effective(cap, rule)
            if not fits(job, host, eff, rule):
                report.policy_violations += 1
                report.note(f"policy: {job.name} claimed by {wid} on {host}")
            for prio in (p for p in priorities if p > job.priority):
                for g, heap in _groups_at(pending, prio):
                    if not fits(example[g], host, eff, rule):
                        continue
                    while heap and is_pending.get(heap[0][2]) != heap[0][1]:
                        heapq.heappop(heap)
                    if heap and (grace_s is None or -heap[0][0] > at + grace_s):
                        report.priority_inversions += 1
                        report.note(
                            f"priority: {job.name} (p{job.priority}) claimed by {wid}"
                            f" while {names[heap[0][2]]} (p{prio}) waited"
                        )
                        break
        elif frm in ACTIVE and to not in ACTIVE:
            holder.pop(jid, None)
            if to == "completed":
                completions[jid] += 1
            else:
                report.false_requeues += 1
                report.note(f"requeue: {job.name} {frm} -> {to} ({kind})")
                if to == "pending":
                    make_pending(jid, index)
    for jid in ours:
        done = completions.get(jid, 0)
        if done > 1 or (require_all_completed and (done != 1 or final.get(jid) != "completed")):
            report.not_completed_once += 1
            report.note(f"completion: {names[jid]} completed {done}x, now {final.get(jid)}")
    return report


def _groups_at(
    pending: dict[tuple[int, tuple[Any, ...]], list[tuple[float, int, str]]], prio: int
) -> list[tuple[tuple[Any, ...], list[tuple[float, int, str]]]]:
    return [(key[1], heap) for key, heap in pending.items() if key[0] == prio and heap]


def _next_claim_times(events: list[tuple[Any, ...]]) -> dict[tuple[str, int], float]:
    """For each (job, index of the event that made it pending; -1 = seeded), when it was next
    claimed."""
    out: dict[tuple[str, int], float] = {}
    since: dict[str, int] = defaultdict(lambda: -1)
    for index, (_seq, jid, at, _kind, frm, to, *_rest) in enumerate(events):
        if to == "claimed" and since[jid] is not None:
            out.setdefault((jid, since[jid]), at)
        elif frm in ACTIVE and to == "pending":
            since[jid] = index
    return out
