"""Scheduling rules shared by every queue backend: who may take a job *now*.

Hardware and policy fit (``matching.blockers``) says whether a worker could ever run a job.
On top of that, two rules defer a claim for a while:

- ``prefer_cuda``: a CPU worker may take the job only after it has been pending for
  ``prefer_cuda_wait_s`` (the manifest's ``[defaults]``), giving CUDA workers first pick.
- host priority: a worker yields a job to an *idle* eligible worker whose host has a higher
  ``priority``. Idle means seen within ``idle_window_s`` and holding no job, so a dead worker
  stops being preferred within that window; nobody waits on it forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainfleet.capability.model import Capability
from trainfleet.manifest.spec import HostPolicy, JobSpec
from trainfleet.queue.matching import blockers


@dataclass(frozen=True)
class Candidate:
    """A worker as the scheduler sees it."""

    worker_id: str
    cap: Capability  # effective capability
    policy: HostPolicy | None
    idle: bool
    current_job: str | None = None

    @property
    def priority(self) -> int:
        return self.policy.priority if self.policy else 0


def prefer_cuda_remaining_s(
    job: JobSpec, cap: Capability, pending_for_s: float, wait_s: float
) -> float:
    """Seconds a CPU worker must still wait before taking a prefer_cuda job (0 = may take)."""
    if not job.prefer_cuda or cap.cuda:
        return 0.0
    return max(0.0, wait_s - pending_for_s)


def deferrals(
    job: JobSpec,
    worker: Candidate,
    others: list[Candidate],
    pending_for_s: float,
    prefer_cuda_wait_s: float,
) -> list[str]:
    """Reasons ``worker`` should not take ``job`` right now although it fits."""
    reasons = []
    remaining = prefer_cuda_remaining_s(job, worker.cap, pending_for_s, prefer_cuda_wait_s)
    if remaining > 0:
        reasons.append(f"prefers CUDA: CPU hosts may take it in {remaining:.0f}s")
    for other in others:
        if (
            other.worker_id != worker.worker_id
            and other.idle
            and other.priority > worker.priority
            and not blockers(job, other.cap, other.policy)
            and prefer_cuda_remaining_s(job, other.cap, pending_for_s, prefer_cuda_wait_s) == 0
        ):
            reasons.append(f"yields to idle higher-priority host {other.cap.host}")
            break
    return reasons
