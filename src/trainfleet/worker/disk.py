"""The worker's own disk: room enough to claim a job, and whose fault a full disk is.

A full disk on the worker is the worker's fault, not the job's, so the attempt is handed back
(released: no failure counted, the reason in the job's event) and the daemon claims nothing
until its workdir has ``min_free_bytes`` free again (``ClaimGate``). One exception keeps a job
that fills the disk with its own files from going round forever: when the attempt's own files
(its outputs, ``output.log``, the packed archive) take at least half of the space that was
free when its process started (``job_filled_disk``), the failure is counted like any other
(retried elsewhere while ``max_failures`` allows). And a worker hands the same job back for a
full disk at most ``MAX_DISK_HANDBACKS`` times; after that the failure is counted too.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from trainfleet import env

log = logging.getLogger(__name__)

DISK_FULL_BYTES = 64 << 10  # less than this free where an attempt writes: the disk is full
DEFAULT_MIN_FREE_BYTES = 1 << 20  # claim a job only with this much free in the workdir
MAX_DISK_HANDBACKS = 3  # full-disk hand-backs of one job by one worker before it counts


def free_bytes(path: Path) -> int | None:
    """Bytes free on the filesystem of ``path`` (or of its nearest existing parent)."""
    for p in (path, *path.absolute().parents):
        try:
            return shutil.disk_usage(p).free
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


def tree_bytes(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (best effort)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += max(st.st_size, getattr(st, "st_blocks", 0) * 512)
    return total


def job_filled_disk(used_bytes: int, free_at_start: int | None) -> bool:
    """Whether the attempt's own files, not something else, filled the disk."""
    if free_at_start is None or free_at_start <= DISK_FULL_BYTES:
        return False  # the disk was already full before the job wrote anything
    return used_bytes * 2 >= free_at_start


def min_free_bytes_from_env() -> int:
    """``TRAINFLEET_MIN_FREE_BYTES``, or the default; never below ``DISK_FULL_BYTES``."""
    raw = os.environ.get(env.MIN_FREE_BYTES, "").strip()
    if not raw:
        return DEFAULT_MIN_FREE_BYTES
    try:
        value = int(raw)
    except ValueError:
        log.warning(
            "%s=%r is not a whole number of bytes: using %d",
            env.MIN_FREE_BYTES,
            raw,
            DEFAULT_MIN_FREE_BYTES,
        )
        return DEFAULT_MIN_FREE_BYTES
    return max(value, DISK_FULL_BYTES)


class ClaimGate:
    """Whether the workdir has room for the next job; says so once when it runs short.

    When short, ``prune`` (the daemon's kept attempt directories, for debugging) is called
    once first, since those are the worker's own leftovers.
    """

    def __init__(
        self, workdir: Path, min_free_bytes: int, prune: Callable[[], int] | None = None
    ) -> None:
        self.workdir = workdir
        self.min_free_bytes = max(min_free_bytes, DISK_FULL_BYTES)
        self.prune = prune
        self.short = False  # logged as short, not yet back

    def has_room(self) -> bool:
        free = free_bytes(self.workdir)
        if free is not None and free < self.min_free_bytes and not self.short and self.prune:
            removed = self.prune()
            if removed:
                log.warning("disk short: removed %d kept attempt directories", removed)
                free = free_bytes(self.workdir)
        if free is None or free >= self.min_free_bytes:
            if self.short:
                log.info(
                    "disk space back (%d bytes free under %s): claiming again",
                    free or 0,
                    self.workdir,
                )
                self.short = False
            return True
        if not self.short:
            log.warning(
                "disk full on worker: %d bytes free under %s (need %d): not claiming jobs"
                " until there is space",
                free,
                self.workdir,
                self.min_free_bytes,
            )
            self.short = True
        return False


__all__ = [
    "DEFAULT_MIN_FREE_BYTES",
    "DISK_FULL_BYTES",
    "MAX_DISK_HANDBACKS",
    "ClaimGate",
    "free_bytes",
    "job_filled_disk",
    "min_free_bytes_from_env",
    "tree_bytes",
]
