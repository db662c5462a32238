"""Explain why a job is (or is not) running, in words an operator can act on.

For a pending job, every online worker is checked against the same rules a claim uses
(``matching.blockers`` then ``scheduling.deferrals``), and declared hosts with no worker
online are checked against their declared policy, so the answer says both what is missing
now and which host could run the job if it came online.

A referee job also names the claim rules of its panel (an enrolled host, not the producer's,
not one that took another job of the panel) and a private job the need for an attested
worker (``claims.referee_host_blocker``, ``claims.tier_blocker``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from trainfleet.capability.policy import declared_capability
from trainfleet.manifest.spec import HostPolicy, JobSpec
from trainfleet.queue.base import JobRecord
from trainfleet.queue.claims import referee_host_blocker, tier_blocker
from trainfleet.queue.matching import blockers, requirement_summary
from trainfleet.queue.scheduling import Candidate, deferrals
from trainfleet.verify.spec import RefereeTask

REFEREE_NEEDS = (
    "needs a referee on an enrolled host other than the producer's and the panel's other hosts"
)
PRIVATE_NEEDS = "private: needs an attested worker"


def market_blockers(
    spec: JobSpec, host: str, attested: bool, panel_hosts: Collection[str]
) -> list[str]:
    """Why a worker on ``host`` may not take a referee or private job (the claim's rules)."""
    why = [w for w in (tier_blocker(spec, attested), referee_host_blocker(spec, host)) if w]
    if isinstance(spec.task, RefereeTask) and host in panel_hosts:
        why.append(f"host {host} already took a job of this panel (one referee per host)")
    return why


def market_needs(spec: JobSpec, panel_hosts: Collection[str]) -> list[str]:
    """What a referee or private job needs beyond hardware, in one line each."""
    needs = []
    if isinstance(spec.task, RefereeTask):
        others = ", ".join(sorted(panel_hosts)) or "none yet"
        needs.append(f"{REFEREE_NEEDS} (producer {spec.task.producer}; panel hosts: {others})")
    if spec.tier == "private":
        needs.append(PRIVATE_NEEDS)
    return needs


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
    attested: Collection[str] = (),
    panel_hosts: Collection[str] = (),
    waiting: str = "",
) -> dict[str, Any]:
    """``attested``: the ids of the workers attested now; ``panel_hosts``: the hosts that
    took another job of a referee job's panel; ``waiting``: a waiting job's parents not
    completed yet, in words (``queue.deps.waiting_text``)."""
    spec = job.spec
    out: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "needs": requirement_summary(spec),
        "hosts": {},
        "eligible_online": [],
    }
    if job.state == "waiting":
        removed = "" if job.in_manifest or job.pinned else " (removed from the manifest)"
        out["message"] = (waiting or "waiting for its parents") + removed
        return out
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
    lines += market_needs(spec, panel_hosts)
    for cand in candidates:
        why = blockers(spec, cand.cap, cand.policy)
        why += market_blockers(spec, cand.cap.host, cand.worker_id in attested, panel_hosts)
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
        why += market_blockers(spec, host, True, panel_hosts)
        joins = "an attested worker" if spec.tier == "private" else "a worker"
        out["hosts"][f"{host} (offline)"] = why or [f"could run it once {joins} joins"]
    if out["eligible_online"]:
        lines.append("eligible hosts online: " + ", ".join(sorted(set(out["eligible_online"]))))
    else:
        lines.append("eligible hosts: none online")
    lines += [f"  {host}: {'; '.join(why)}" for host, why in out["hosts"].items()]
    out["message"] = "\n".join(lines)
    return out
