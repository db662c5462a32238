"""Garbage collection of unbound artifact blobs.

A blob is bound when an artifact record (``JobQueue.is_bound``) names its digest. An upload
stores its bytes first and binds them second, so a blob can be left unbound: the upload was
fenced (a stale epoch found after streaming), or the coordinator stopped in between. The
coordinator's lifespan runs :func:`collect_garbage` periodically; a blob younger than the
grace period is kept, so an upload between its commit and its binding is never collected
(committing an already stored blob restarts its grace period), nor one an upload in this
process has pinned (``ArtifactStore.pinned``: between its commit and its binding).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainfleet.artifacts.store import ArtifactStore
    from trainfleet.queue.base import JobQueue

log = logging.getLogger(__name__)

GRACE_S = 3600.0
INTERVAL_S = 600.0


def collect_garbage(
    store: ArtifactStore,
    queue: JobQueue,
    grace_s: float = GRACE_S,
    staging_dir: Path | None = None,
) -> list[str]:
    """Delete blobs older than ``grace_s`` that no artifact record binds; return their
    digests. Staged upload files older than that (left by a crash) go too."""
    cutoff = time.time() - grace_s
    if staging_dir is not None and staging_dir.is_dir():
        for part in staging_dir.glob("upload-*.part"):
            with contextlib.suppress(FileNotFoundError):  # a racing commit moved it
                if part.stat().st_mtime < cutoff:
                    part.unlink()
                    log.info("artifact gc: removed abandoned staging file %s", part.name)
    removed: list[str] = []
    for sha256, mtime in list(store.stored()):
        if mtime > cutoff or queue.is_bound(sha256):
            continue
        # Checked again under the store's commit lock: an upload may have re-committed,
        # pinned or bound this digest since the listing.
        if store.delete_unbound(sha256, queue.is_bound, older_than=cutoff):
            removed.append(sha256)
            log.info("artifact gc: removed unbound blob %s", sha256)
    return removed
