"""Explain why a job is (or is not) running, in words an operator can act on.

For a pending job, every online worker is checked against the same rules a claim uses
(``matching.blockers`` then ``scheduling.deferrals``), and declared hosts with no worker
online are checked against their declared policy, so the answer says both what is missing
now and which host could run the job if it came online.
"""

from __future__ import annotations

from typing import Any

from trainfleet.capability.policy import declared_capability
from trainfleet.manifest.spec import HostPolicy
from trainfleet.queue.base import JobRecord
from trainfleet.queue.matching import blockers, requirement_summary
from trainfleet.queue.scheduling import Candidate, deferrals


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
    if not job.in_manifest and not job.pinned:
        out["message"] = (
            f"pending for {pending_for:.0f}s but removed from the manifest by a reload:"
            f" not claimable; `trainfleet requeue {job.id[:12]}` runs it anyway"
        )
        return out
    lines = [f"pending for {pending_for:.0f}s; needs {out['needs']}"]
    for cand in candidates:
        why = blockers(spec, cand.cap, cand.policy)
        if not why:
            out["eligible_online"].append(cand.cap.host)
            if cand.current_job:
                why = [f"eligible but busy with job {cand.current_job[:12]}"]
            else:
                why = deferrals(spec, cand, candidates, pending_for, prefer_cuda_wait_s) or [
                    "eligible and idle: it takes the job at its next poll"
                ]
        out["hosts"][f"{cand.cap.host} ({cand.worker_id})"] = why
    online_hosts = {cand.cap.host for cand in candidates}
    for host, policy in hosts.items():
        if host in online_hosts:
            continue
        why = blockers(spec, declared_capability(host, policy), policy)
        out["hosts"][f"{host} (offline)"] = why or ["could run it once a worker joins"]
    if out["eligible_online"]:
        lines.append("eligible hosts online: " + ", ".join(sorted(set(out["eligible_online"]))))
    else:
        lines.append("eligible hosts: none online")
    lines += [f"  {host}: {'; '.join(why)}" for host, why in out["hosts"].items()]
    out["message"] = "\n".join(lines)
    return out
