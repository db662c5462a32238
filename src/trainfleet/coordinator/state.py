"""The coordinator's state: its queue, artifact store, tokens, access modes and timing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainfleet.artifacts import ArtifactStore
from trainfleet.coordinator.metrics import Metrics
from trainfleet.queue.base import JobQueue


@dataclass
class Coordinator:
    queue: JobQueue
    store: ArtifactStore
    staging_dir: Path
    operator_token: str
    join_token: str  # the shared join token: refused unless open_join
    open_join: bool = False  # anyone with join_token may join, as a new policy-less host
    public_reads: bool = False  # read endpoints and /metrics need no token
    heartbeat_interval_s: float = 2.0
    reap_interval_s: float = 1.0
    max_upload_bytes: int = 16 * 1024**3
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics(self.queue)
