"""The coordinator's state: its queue, artifact store, tokens, access modes, timing and the
round driver of collaborative runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainfleet.artifacts import ArtifactStore
from trainfleet.coordinator.metrics import Metrics
from trainfleet.queue.base import JobQueue

if TYPE_CHECKING:
    from trainfleet.coordinator.rounds import RoundDriver


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
    runs_dir: Path | None = None  # the round driver's files (eval cache); default beside staging
    metrics: Metrics = field(init=False)
    rounds: RoundDriver = field(init=False)  # drives collaborative runs (coordinator.rounds)

    def __post_init__(self) -> None:
        from trainfleet.coordinator.rounds import RoundDriver

        self.staging_dir.mkdir(parents=True, exist_ok=True)
        if self.runs_dir is None:
            self.runs_dir = self.staging_dir.parent / "runs"
        self.metrics = Metrics(self.queue)
        self.rounds = RoundDriver(self)
