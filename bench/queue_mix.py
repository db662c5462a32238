"""The seeded workload of bench.queue: which jobs, which workers, which host rules.

Jobs come in five kinds (unconstrained, CUDA with a VRAM floor, large RAM and cores, names
some hosts deny, an ``allowed_hosts`` list) at three priorities, written as one manifest
TOML. Workers cycle over four capability classes, worker 0 being the class that fits every
job, so a fleet of any size N >= 1 can drain the queue. Hosts ``h{i}`` with i % 5 == 4 deny
the ``-x-`` jobs; hosts with i % 6 == 2 declare ``cuda = false`` (their GPU is not to be
used). The same few rules, written here once and independently of trainfleet's code
(``effective`` and ``fits``), drive the reference server and the invariant checker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

PRIORITIES = (0, 1, 2)
DENY_PATTERN = "*-x-*"
ALLOWED = [f"h{i}" for i in range(16)]  # a pinned job's hosts: few enough to constrain

# Capability classes; worker i gets CLASSES[i % 4]. Class 0 fits every job.
CLASSES: list[dict[str, Any]] = [
    {"cores": 32, "ram_gib": 512.0, "cuda": True, "num_gpus": 8, "vram_gib": 80.0},
    {"cores": 4, "ram_gib": 16.0, "cuda": False, "num_gpus": 0, "vram_gib": 0.0},
    {"cores": 8, "ram_gib": 64.0, "cuda": True, "num_gpus": 1, "vram_gib": 24.0},
    {"cores": 32, "ram_gib": 256.0, "cuda": False, "num_gpus": 0, "vram_gib": 0.0},
]


@dataclass(frozen=True)
class JobReq:
    """What a job needs: the fields of its spec a claim must honour."""

    name: str
    priority: int
    require_cuda: bool = False
    min_vram_gib: float = 0.0
    min_ram_gib: float = 0.0
    min_cores: int = 1
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostRule:
    """The host policy fields the bench uses."""

    deny_jobs: tuple[str, ...] = ()
    cuda: bool | None = None


def job_reqs(n: int, seed: int = 0, prefix: str = "j") -> list[JobReq]:
    """``n`` jobs, the same for the same seed."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        prio = rng.choices(PRIORITIES, weights=(6, 3, 1))[0]
        kind = rng.choices(("any", "cuda", "big", "x", "pin"), weights=(58, 15, 15, 10, 2))[0]
        name = f"{prefix}-{kind}-{i:06d}"
        if kind == "cuda":
            vram = rng.choice((0.0, 16.0, 40.0))
            jobs.append(JobReq(name, prio, require_cuda=True, min_vram_gib=vram))
        elif kind == "big":
            jobs.append(JobReq(name, prio, min_ram_gib=64.0, min_cores=8))
        elif kind == "pin":
            jobs.append(JobReq(name, prio, allowed_hosts=tuple(ALLOWED)))
        else:
            jobs.append(JobReq(name, prio))
    return jobs


def host_rules(num_hosts: int) -> dict[str, HostRule]:
    """The host policies of ``h0 .. h{num_hosts-1}`` that say something."""
    rules = {}
    for i in range(num_hosts):
        deny = (DENY_PATTERN,) if i % 5 == 4 else ()
        cuda = False if i % 6 == 2 else None
        if deny or cuda is not None:
            rules[f"h{i}"] = HostRule(deny, cuda)
    return rules


def capability(i: int, host: str) -> dict[str, Any]:
    """Worker ``i``'s capability as it registers it."""
    return {"host": host, "hostname": host, **CLASSES[i % len(CLASSES)]}


def manifest_toml(jobs: list[JobReq], rules: dict[str, HostRule]) -> str:
    """The manifest both servers load: hosts first, then the jobs in order."""
    out = []
    for host, rule in rules.items():
        out.append(f"[hosts.{host}]")
        if rule.deny_jobs:
            out.append("deny_jobs = [" + ", ".join(f'"{p}"' for p in rule.deny_jobs) + "]")
        if rule.cuda is not None:
            out.append(f"cuda = {str(rule.cuda).lower()}")
    for job in jobs:
        out.append("[[jobs]]")
        out.append(f'name = "{job.name}"')
        out.append(f"priority = {job.priority}")
        out.append('kind = "command"')
        out.append('command = ["true"]')
        if job.require_cuda:
            out.append("require_cuda = true")
        if job.min_vram_gib:
            out.append(f"min_vram_gib = {job.min_vram_gib}")
        if job.min_ram_gib:
            out.append(f"min_ram_gib = {job.min_ram_gib}")
        if job.min_cores > 1:
            out.append(f"min_cores = {job.min_cores}")
        if job.allowed_hosts:
            out.append("allowed_hosts = [" + ", ".join(f'"{h}"' for h in job.allowed_hosts) + "]")
    return "\n".join(out) + "\n"


def effective(cap: dict[str, Any], rule: HostRule | None) -> dict[str, Any]:
    """The capability a claim may use: a ``cuda = false`` host has no usable GPU."""
    if rule is not None and rule.cuda is False and cap.get("cuda"):
        return {**cap, "cuda": False, "num_gpus": 0, "vram_gib": 0.0}
    return cap


def fits(job: JobReq, host: str, cap: dict[str, Any], rule: HostRule | None) -> bool:
    """Whether a worker on ``host`` with effective capability ``cap`` may run ``job``."""
    if job.allowed_hosts and host not in job.allowed_hosts:
        return False
    if rule is not None and any(fnmatchcase(job.name, p) for p in rule.deny_jobs):
        return False
    if job.require_cuda and not cap.get("cuda"):
        return False
    return (
        job.min_vram_gib <= float(cap.get("vram_gib", 0.0))
        and job.min_ram_gib <= float(cap.get("ram_gib", 0.0))
        and job.min_cores <= int(cap.get("cores", 1))
    )
