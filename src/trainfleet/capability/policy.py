"""Host policy: intersect declared capability with detected capability; allow/deny lists.

The more restrictive side always wins: a declaration can only take capability away, never
add what was not detected.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

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
    num_gpus = detected.num_gpus if cuda else 0
    if policy.num_gpus is not None:
        if policy.num_gpus > num_gpus:
            notes.append(f"declared num_gpus={policy.num_gpus}, detected {num_gpus}")
        num_gpus = min(num_gpus, policy.num_gpus)
    if num_gpus == 0:
        cuda = False
    vram = detected.vram_gib if cuda else 0.0
    if policy.vram_gib is not None:
        if policy.vram_gib > vram:
            notes.append(f"declared vram_gib={policy.vram_gib:g}, detected {vram:g}")
        vram = min(vram, policy.vram_gib)
    ram = detected.ram_gib
    if policy.ram_gib is not None:
        if policy.ram_gib > ram:
            notes.append(f"declared ram_gib={policy.ram_gib:g}, detected {ram:g}")
        ram = min(ram, policy.ram_gib)
    cores = detected.cores
    if policy.cores is not None:
        if policy.cores > cores:
            notes.append(f"declared cores={policy.cores}, detected {cores}")
        cores = min(cores, policy.cores)
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
