"""Detect this machine's capability: cores, RAM, CUDA devices, software versions."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import psutil

import trainfleet
from trainfleet.capability.model import MAX_TEXT_CHARS, Capability, policy_host_name

_GIB = 1024**3


def _cuda_devices() -> tuple[list[str], list[float], str]:
    """(names, vram_gib, torch_version); empty lists when torch or CUDA is unavailable."""
    try:
        import torch
    except ImportError:
        return [], [], ""
    if not torch.cuda.is_available():
        return [], [], torch.__version__
    names, vram = [], []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        names.append(props.name)
        vram.append(round(props.total_memory / _GIB, 2))
    return names, vram, torch.__version__


def code_version() -> str:
    """trainfleet's version, with the git commit of its checkout when there is one."""
    version = trainfleet.__version__
    src = Path(trainfleet.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}" if commit else version


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def detect_capability(host: str | None = None) -> Capability:
    """Detect what this machine has. ``host`` overrides the hostname used for policy."""
    names, vram, torch_version = _cuda_devices()
    hostname = "".join(c for c in socket.gethostname() if c.isprintable())[:MAX_TEXT_CHARS]
    return Capability(
        host=host or policy_host_name(hostname),
        hostname=hostname,
        cores=_usable_cores(),
        ram_gib=round(psutil.virtual_memory().total / _GIB, 2),
        cuda=bool(names),
        num_gpus=len(names),
        gpu_names=names,
        vram_gib=max(vram, default=0.0),
        torch_version=torch_version,
        python_version=platform.python_version(),
        code_version=code_version(),
        platform=f"{sys.platform}-{platform.machine()}",
    )
