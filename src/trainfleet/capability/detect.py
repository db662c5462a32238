"""Detect this machine's capability: cores, RAM, CUDA devices, software versions.

The worker daemon never imports torch (it runs jobs; it does not train): torch's version is
read from its installed metadata, and CUDA devices are asked for only where an NVIDIA driver
is present, by torch in a short-lived child process. So on a CPU machine `trainfleet join`
imports and detects in 0.6 s of CPU and 65 MiB (1.9 s and 247 MiB with torch), and on a GPU
machine the daemon holds no CUDA context: all GPU memory is left to its jobs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import psutil

import trainfleet
from trainfleet.capability.model import MAX_TEXT_CHARS, Capability, policy_host_name

log = logging.getLogger(__name__)

_GIB = 1024**3
PROBE_TIMEOUT_S = 120.0  # a first CUDA initialisation can take tens of seconds
MAX_PROBE_BYTES = 64 * 1024  # the probe's reply: a few names and numbers
# Where an NVIDIA driver shows itself: the kernel module's files on Linux (also inside a
# container given GPUs), WSL 2's GPU device. Without any of them torch finds no CUDA device.
DRIVER_MARKS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")

# Run by ``sys.executable -c``: one JSON line on stdout.
_PROBE = """\
import json, torch
devices = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append([p.name, p.total_memory])
print(json.dumps({"torch": torch.__version__, "devices": devices}))
"""


def _torch_version() -> str:
    """The installed torch's version, from its metadata (no import); "" without torch."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return ""


def _driver_present() -> bool:
    return any(os.path.exists(mark) for mark in DRIVER_MARKS)


@functools.cache
def _cuda_devices() -> tuple[tuple[str, ...], tuple[float, ...], str]:
    """(names, vram_gib, torch_version); no devices when torch, the driver or CUDA is not
    there. Asked once per process: the devices of a running machine do not change."""
    version = _torch_version()
    if not version or not _driver_present():
        return (), (), version
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE],
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            tail = done.stderr[-2000:].decode(errors="replace").strip()
            raise ValueError(f"exit status {done.returncode}: {tail}")
        last = done.stdout[-MAX_PROBE_BYTES:].decode(errors="replace").splitlines()[-1]
        reply = json.loads(last)
        devices = [(str(name)[:MAX_TEXT_CHARS], int(memory)) for name, memory in reply["devices"]]
        found = str(reply["torch"])[:MAX_TEXT_CHARS]
    except (OSError, subprocess.SubprocessError, ValueError, LookupError, TypeError) as err:
        log.warning(
            "an NVIDIA driver is present but torch's CUDA probe failed (%s): this worker"
            " reports no GPU and takes CPU jobs only",
            err,
        )
        return (), (), version
    names = tuple(name for name, _ in devices)
    vram = tuple(round(memory / _GIB, 2) for _, memory in devices)
    return names, vram, found


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
        gpu_names=list(names),
        vram_gib=max(vram, default=0.0),
        torch_version=torch_version,
        python_version=platform.python_version(),
        code_version=code_version(),
        platform=f"{sys.platform}-{platform.machine()}",
    )
