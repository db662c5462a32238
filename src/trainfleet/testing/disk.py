"""A small filesystem of its own for a worker's workdir, so a test can fill it for real.

``SmallDisk`` mounts a size-capped tmpfs (needs root, or CAP_SYS_ADMIN, which CI and the
development machine have); ``fill`` writes a filler file until the kernel answers ENOSPC,
``free`` removes it, ``unmount`` always runs at teardown. Where mounting is not allowed,
:func:`disk_faults_unavailable` says why, and a test should skip with that reason (a skip is
not coverage).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["DiskFaultUnavailable", "SmallDisk", "disk_faults_unavailable"]

_FILLER = ".trainfleet-testing-filler"


class DiskFaultUnavailable(RuntimeError):
    """This machine cannot give a worker a disk of its own to fill (no mount rights)."""


@functools.cache
def disk_faults_unavailable() -> str | None:
    """None if a tmpfs can be mounted here, else the reason it cannot (probed once)."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount binaries"
    with tempfile.TemporaryDirectory(prefix="trainfleet-disk-probe-") as tmp:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", tmp],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            return f"cannot mount a tmpfs (uid {os.getuid()}): {done.stderr.strip()}"
        subprocess.run(["umount", tmp], capture_output=True, check=False)
    return None


class SmallDisk:
    """A tmpfs of ``size_mib`` mounted at ``path`` (created if missing)."""

    def __init__(self, path: Path, size_mib: int) -> None:
        reason = disk_faults_unavailable()
        if reason is not None:
            raise DiskFaultUnavailable(reason)
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        self.mounted = True

    def fill(self) -> int:
        """Write until ENOSPC; return the bytes written. The disk then has 0 bytes free."""
        block = b"\0" * (1 << 16)
        written = 0
        with (self.path / _FILLER).open("ab", buffering=0) as f:
            try:
                while True:
                    written += f.write(block)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
            try:  # top up the last partial block
                while True:
                    written += f.write(b"\0" * 512)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / _FILLER).unlink()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def unmount(self) -> None:
        if not self.mounted:
            return
        done = subprocess.run(["umount", str(self.path)], capture_output=True, check=False)
        if done.returncode != 0:  # something still has it open: detach it lazily
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
        self.mounted = False
