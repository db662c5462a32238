"""Does a job fit a worker? The one rule used by claim, explain and manifest load."""

from __future__ import annotations

from trainfleet.capability.model import Capability
from trainfleet.capability.policy import job_allowed_on_host
from trainfleet.manifest.spec import HostPolicy, JobSpec


def unmet_requirements(job: JobSpec, cap: Capability) -> list[str]:
    """Hardware requirements of ``job`` that ``cap`` (an effective capability) does not meet."""
    unmet = []
    if job.require_cuda and not cap.cuda:
        unmet.append("needs CUDA")
    if job.min_vram_gib > cap.vram_gib:
        unmet.append(f"needs a GPU with >= {job.min_vram_gib:g} GiB VRAM (has {cap.vram_gib:g})")
    if job.min_ram_gib > cap.ram_gib:
        unmet.append(f"needs >= {job.min_ram_gib:g} GiB RAM (has {cap.ram_gib:g})")
    if job.min_cores > cap.cores:
        unmet.append(f"needs >= {job.min_cores} cores (has {cap.cores})")
    return unmet


def blockers(job: JobSpec, cap: Capability, policy: HostPolicy | None) -> list[str]:
    """Every reason ``job`` may not run on the worker with effective capability ``cap``."""
    reasons = []
    if job.allowed_hosts and cap.host not in job.allowed_hosts:
        reasons.append("not in the job's allowed_hosts")
    denied = job_allowed_on_host(job.name, policy)
    if denied:
        reasons.append(f"{denied} on host {cap.host}")
    return reasons + unmet_requirements(job, cap)


def requirement_summary(job: JobSpec) -> str:
    """Human summary of what a job needs, e.g. 'CUDA >= 24 GiB, >= 4 cores'."""
    parts = []
    if job.require_cuda:
        parts.append(f"CUDA >= {job.min_vram_gib:g} GiB" if job.min_vram_gib else "CUDA")
    elif job.prefer_cuda:
        parts.append("prefers CUDA")
    if job.min_ram_gib:
        parts.append(f">= {job.min_ram_gib:g} GiB RAM")
    if job.min_cores > 1:
        parts.append(f">= {job.min_cores} cores")
    if job.allowed_hosts:
        parts.append("hosts " + ",".join(job.allowed_hosts))
    return ", ".join(parts) or "any host"
