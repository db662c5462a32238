"""Explain why a job is (or is not) running, in words an operator can act on.

For a pending job, every online worker is checked against the same rules a claim uses
(``matching.blockers`` then ``scheduling.deferrals``), and declared hosts with no worker
online are checked against their declared policy, so the answer says both what is missing
now and which host could run the job if it came online.
"""

from __future__ import annotations

from typing import Any

from trainfleet.capability.model import Capability
from trainfleet.manifest.spec import HostPolicy
from trainfleet.queue.base import JobRecord, WorkerRecord
from trainfleet.queue.matching import blockers, requirement_summary
from trainfleet.queue.scheduling import Candidate, deferrals


def _declared(host: str, policy: HostPolicy) -> Capability:
    """What a declared host offers at most (undeclared amounts count as unbounded)."""
    cuda = bool(policy.cuda) and policy.num_gpus != 0
    return Capability(
        host=host,
        hostname=host,
        cores=policy.cores or 1_000_000,
        ram_gib=policy.ram_gib if policy.ram_gib is not None else 1e9,
        cuda=cuda,
        num_gpus=(policy.num_gpus or 1) if cuda else 0,
        vram_gib=(policy.vram_gib if policy.vram_gib is not None else 1e9) if cuda else 0.0,
    )


def _active_summary(job: JobRecord, now: float) -> str:
    if job.state in ("claimed", "running"):
        beat = f"{now - job.heartbeat_at:.0f}s ago" if job.heartbeat_at else "never"
        return (
            f"{job.state} on host {job.host} by {job.worker_id} (attempt {job.attempt},"
            f" epoch {job.epoch}); last heartbeat {beat}"
        )
    if job.state == "completed":
        return f"completed on host {job.host} after {job.attempt} attempt(s)"
    return f"{job.state}: {job.error or 'no reason recorded'}"


def explain_job(
    job: JobRecord,
    *,
    workers: list[WorkerRecord],
    candidates: list[Candidate],
    hosts: dict[str, HostPolicy],
    prefer_cuda_wait_s: float,
    now: float,
) -> dict[str, Any]:
    spec = job.spec
    out: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "needs": requirement_summary(spec),
        "hosts": {},
        "eligible_online": [],
    }
    if job.state != "pending":
        out["message"] = _active_summary(job, now)
        return out
    pending_for = now - (job.pending_since or now)
    by_id = {c.worker_id: c for c in candidates}
    lines = [f"pending for {pending_for:.0f}s; needs {out['needs']}"]
    online_hosts = set()
    busy = []
    for worker in workers:
        cand = by_id.get(worker.id)
        if cand is None:
            continue
        online_hosts.add(worker.host)
        why = blockers(spec, cand.cap, cand.policy)
        if not why:
            out["eligible_online"].append(worker.host)
            if worker.current_job:
                busy.append(worker.host)
                why = [f"eligible but busy with job {worker.current_job[:12]}"]
            else:
                why = deferrals(spec, cand, candidates, pending_for, prefer_cuda_wait_s) or [
                    "eligible and idle: it takes the job at its next poll"
                ]
        out["hosts"][f"{worker.host} ({worker.id})"] = why
    for host, policy in hosts.items():
        if host in online_hosts:
            continue
        why = blockers(spec, _declared(host, policy), policy)
        out["hosts"][f"{host} (offline)"] = why or ["could run it once a worker joins"]
    if out["eligible_online"]:
        lines.append("eligible hosts online: " + ", ".join(sorted(set(out["eligible_online"]))))
    else:
        lines.append("eligible hosts: none online")
    lines += [f"  {host}: {'; '.join(why)}" for host, why in out["hosts"].items()]
    out["message"] = "\n".join(lines)
    return out
