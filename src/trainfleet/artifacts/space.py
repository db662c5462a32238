"""Disk space for uploads, reserved before a byte is read.

An upload declares its size up front. Before streaming it, the coordinator reserves that
many bytes against the free space of the staging directory, less what uploads already in
flight have reserved and a margin kept free for the queue's database (``KEEP_FREE_BYTES``):
an upload that cannot fit is refused at once (507), so uploads (a flood of them from one
worker holding a claim, or one that is simply too large) cannot fill the disk the SQLite
queue writes to. Running out anyway (another process writing) still ends as a 507 with
nothing kept (``ENOSPC`` while streaming).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from trainfleet.errors import InsufficientStorage

KEEP_FREE_BYTES = 256 * 1024 * 1024

_lock = threading.Lock()
_reserved: dict[str, int] = {}  # device of a staging directory -> bytes reserved in flight


@contextmanager
def reserve(directory: str | os.PathLike[str], size: int) -> Iterator[None]:
    """Hold ``size`` bytes of ``directory``'s free space while the block runs, or raise
    :class:`InsufficientStorage` when they would leave less than ``KEEP_FREE_BYTES``."""
    key = str(os.stat(directory).st_dev)
    with _lock:
        free = shutil.disk_usage(directory).free
        held = _reserved.get(key, 0)
        if held + size + KEEP_FREE_BYTES > free:
            raise InsufficientStorage(
                f"the coordinator cannot take {size} more bytes now ({free} free, {held}"
                f" reserved by uploads in flight, {KEEP_FREE_BYTES} kept free); nothing was"
                " read, retry later"
            )
        _reserved[key] = held + size
    try:
        yield
    finally:
        with _lock:
            _reserved[key] -= size
            if not _reserved[key]:
                del _reserved[key]
