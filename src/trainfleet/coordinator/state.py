"""The coordinator's state: its queue, artifact store, tokens, access modes, timing, the
round driver of collaborative runs, and what it keeps in memory for speed: the heartbeat
book, the credential cache and the signal that wakes long-poll claims."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainfleet.artifacts import ArtifactStore
from trainfleet.coordinator.auth import TokenCache
from trainfleet.coordinator.beats import HeartbeatBook, Pace
from trainfleet.coordinator.leader import Leadership, leadership_for
from trainfleet.coordinator.longpoll import WorkSignal
from trainfleet.coordinator.metrics import Metrics
from trainfleet.queue.base import JobQueue
from trainfleet.verify.attest import AttestationPolicy

if TYPE_CHECKING:
    from trainfleet.coordinator.market import MarketDriver
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
    beat_flush_s: float = 1.0  # heartbeats absorbed in memory are written this often (beats)
    beat_budget_per_s: float = 500.0  # heartbeats/s the fleet may send: scales the interval
    max_upload_bytes: int = 16 * 1024**3
    runs_dir: Path | None = None  # the round driver's files (eval cache); default beside staging
    attestation: AttestationPolicy | None = None  # the private tier (verify.attest); None: off
    metrics: Metrics = field(init=False)
    rounds: RoundDriver = field(init=False)  # drives collaborative runs (coordinator.rounds)
    market: MarketDriver = field(init=False)  # competitions, referee panels (.market)
    db_executor: ThreadPoolExecutor = field(init=False)  # runs queue calls (coordinator.writer)
    beats: HeartbeatBook = field(init=False)  # heartbeats in memory (coordinator.beats)
    work: WorkSignal = field(init=False)  # wakes long-poll claims (coordinator.longpoll)
    tokens: TokenCache = field(init=False)  # credentials -> ids, briefly (coordinator.auth)
    leader: Leadership = field(init=False)  # runs the reaper and ticker? (coordinator.leader)

    def __post_init__(self) -> None:
        from trainfleet.coordinator.market import MarketDriver
        from trainfleet.coordinator.rounds import RoundDriver
        from trainfleet.coordinator.writer import make_db_executor

        self.staging_dir.mkdir(parents=True, exist_ok=True)
        if self.runs_dir is None:
            self.runs_dir = self.staging_dir.parent / "runs"
        self.metrics = Metrics(self.queue)
        self.db_executor = make_db_executor(self.queue)
        self.queue.reap_on_claim = False  # only the reaper reaps, after flushing the book
        self.rounds = RoundDriver(self)
        self.market = MarketDriver(self)
        pace = Pace(
            base_interval_s=self.heartbeat_interval_s,
            min_lease_s=self.queue.settings.heartbeat_timeout_s,
            budget_per_s=self.beat_budget_per_s,
        )
        self.beats = HeartbeatBook(self.queue, pace)
        self.work = WorkSignal()
        self.tokens = TokenCache()
        self.leader = leadership_for(self.queue)
