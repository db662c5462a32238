"""Host policy: intersect declared capability with detected capability; allow/deny lists.

The more restrictive side always wins: a declaration can only take capability away, never
add what was not detected.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from trainfleet.capability.model import Capability
from trainfleet.manifest.spec import HostPolicy


def effective_capability(
    detected: Capability, policy: HostPolicy | None
) -> tuple[Capability, list[str]]:
    """Return (effective capability, notes on each correction made)."""
    if policy is None:
        return detected, []
    notes: list[str] = []
    cuda = detected.cuda
    if policy.cuda is True and not detected.cuda:
        notes.append("declared cuda=true but no CUDA device was detected: CPU-only")
    if policy.cuda is False and detected.cuda:
        notes.append("CUDA detected but the host policy declares cuda=false: CPU-only")
        cuda = False
    num_gpus = _capped("num_gpus", policy.num_gpus, detected.num_gpus if cuda else 0, notes)
    if num_gpus == 0:
        cuda = False
    vram = _capped("vram_gib", policy.vram_gib, detected.vram_gib if cuda else 0.0, notes)
    ram = _capped("ram_gib", policy.ram_gib, detected.ram_gib, notes)
    cores = _capped("cores", policy.cores, detected.cores, notes)
    effective = detected.model_copy(
        update={
            "cuda": cuda,
            "num_gpus": num_gpus,
            "gpu_names": detected.gpu_names[:num_gpus],
            "vram_gib": vram,
            "ram_gib": ram,
            "cores": cores,
        }
    )
    return effective, notes


def _capped(name: str, declared: float | None, detected: float, notes: list[str]) -> Any:
    """The smaller of declared and detected; a declaration above detection is noted."""
    if declared is None:
        return detected
    if declared > detected:
        notes.append(f"declared {name}={declared:g}, detected {detected:g}")
    return min(detected, declared)


def declared_capability(host: str, policy: HostPolicy) -> Capability:
    """The most a declared host could offer once a worker joins: declared caps, everything
    undeclared unbounded, and CUDA unless the policy rules it out (unset means detection
    decides, so it may be there)."""
    unbounded = 1e9
    cuda = policy.cuda is not False and policy.num_gpus != 0
    return Capability(
        host=host,
        hostname=host,
        cores=policy.cores or 10**9,
        ram_gib=policy.ram_gib if policy.ram_gib is not None else unbounded,
        cuda=cuda,
        num_gpus=(policy.num_gpus or 1) if cuda else 0,
        vram_gib=(policy.vram_gib if policy.vram_gib is not None else unbounded) if cuda else 0.0,
    )


def job_allowed_on_host(job_name: str, policy: HostPolicy | None) -> str | None:
    """None if the host's allow/deny lists admit the job, else the reason it is denied."""
    if policy is None:
        return None
    for pattern in policy.deny_jobs:
        if fnmatchcase(job_name, pattern):
            return f"denied by deny_jobs pattern {pattern!r}"
    if not any(fnmatchcase(job_name, p) for p in policy.allow_jobs):
        return "not in allow_jobs"
    return None
