"""Queue records and the ``JobQueue`` interface every backend implements.

State machine of a job::

    pending ──claim──▶ claimed ──first heartbeat──▶ running ──complete──▶ completed
       ▲                  │                            │
       └── lost heartbeat / retryable fail / hand-back ┘──fail (attempts used up)──▶ failed
    pending | claimed | running ──cancel──▶ cancelled      (any non-active) ──requeue──▶ pending

Each claim increments the job's ``epoch``; heartbeat, log, upload, complete and fail name the
epoch and are refused with ``StaleEpoch`` unless it is still current.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainfleet.capability.model import Capability
from trainfleet.errors import ApiError
from trainfleet.manifest.spec import JobSpec, Manifest
from trainfleet.queue.runs_base import (
    ContributionRecord,
    RoundOutcome,
    RoundRecord,
    RoundStatus,
    RunRecord,
    Verdict,
)

if TYPE_CHECKING:
    from trainfleet.queue.beats import Beat, FlushResult
    from trainfleet.queue.fairshare import FairShareReport, FairShareState
    from trainfleet.queue.market_base import (
        CompetitionRecord,
        LedgerEntry,
        SubmissionRecord,
    )
    from trainfleet.queue.pipelines_base import (
        AckResult,
        LeaseReply,
        PipelineCounts,
        PipelineRecord,
        ProducerSync,
        PublishReply,
    )
    from trainfleet.verify.market import CompetitionSpec
    from trainfleet.verify.panel import RefereeReport
    from trainfleet.verify.panel import Verdict as PanelVerdict

JobState = Literal["waiting", "pending", "claimed", "running", "completed", "failed", "cancelled"]
ACTIVE_STATES: tuple[JobState, ...] = ("claimed", "running")
TERMINAL_STATES: tuple[JobState, ...] = ("completed", "failed", "cancelled")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class QueueSettings(_Record):
    """Timing rules of the queue (coordinator flags set these)."""

    heartbeat_timeout_s: float = Field(
        30.0, gt=0, description="an active job whose last heartbeat is older is requeued"
    )
    idle_window_s: float = Field(
        10.0, gt=0, description="a worker seen this recently with no job counts as idle"
    )
    offline_after_s: float = Field(60.0, gt=0, description="a worker unseen this long is offline")
    shard_plan_budget_s: float = Field(
        10.0,
        gt=0,
        description="time the coordinator may spend planning a dataset's shards (once per"
        " digest, at the first completion); past it the dataset is ledgered unverified",
    )


class JobRecord(_Record):
    id: str
    name: str
    state: JobState
    spec: JobSpec
    priority: int
    attempt: int = Field(description="number of claims so far")
    num_failures: int = Field(description="attempts that failed or were lost")
    epoch: int = Field(description="fencing epoch of the current (or last) claim")
    worker_id: str | None
    host: str | None
    created_at: float
    updated_at: float
    pending_since: float | None
    claimed_at: float | None
    heartbeat_at: float | None
    finished_at: float | None
    in_manifest: bool = Field(
        description="false once a reload removed it: it stays visible, but while pending it is"
        " not claimable unless an operator requeues it (see pinned)"
    )
    pinned: bool = Field(
        False,
        description="an operator requeued it after a reload removed it: claimable although"
        " not in the manifest (cleared when a reload adds it back)",
    )
    submitted: bool = Field(
        False,
        description="added by `trainfleet submit` (POST /v1/jobs), not by a manifest: kept"
        " and claimable across reloads (in_manifest is false)",
    )
    manifest_hash: str
    result: dict[str, Any] | None
    error: str | None
    flags: list[str] = Field(
        default_factory=list,
        description="problems found in an accepted result, e.g. a shard hash that disagrees",
    )


class RouterRecord(_Record):
    fit_id: str = Field(description="digest of the dataset fields the router is fit on")
    digest: str = Field(description="the router's own digest (parameters and centroids)")
    published_at: float


class Claim(_Record):
    job: JobRecord
    epoch: int
    attempt: int


class HeartbeatReply(_Record):
    cancel: bool = Field(description="the job was cancelled: stop it and report nothing more")
    state: JobState


class Event(_Record):
    seq: int
    job_id: str
    at: float
    kind: str
    from_state: str | None
    to_state: str | None
    worker_id: str | None
    epoch: int | None
    detail: str


class WorkerRecord(_Record):
    id: str
    host: str
    capability: Capability = Field(description="what the worker detected")
    effective: Capability = Field(description="detected intersected with the host's policy")
    notes: list[str] = Field(description="corrections made by the intersection")
    state: Literal["online", "offline", "stopped", "revoked"]
    registered_at: float
    last_seen: float
    current_job: str | None


class HostRecord(_Record):
    """An enrolled host (its token is never part of it)."""

    name: str
    state: Literal["active", "revoked"]
    enrolled_at: float
    rotated_at: float
    revoked_at: float | None
    workers_online: int = Field(
        description="workers of this host online now (seen within offline_after_s), as"
        " `trainfleet workers` counts them"
    )


class LogLine(_Record):
    seq: int
    attempt: int
    epoch: int
    at: float
    line: str


class ArtifactRecord(_Record):
    sha256: str
    size: int
    name: str
    job_id: str
    attempt: int
    epoch: int
    worker_id: str
    capability: Capability
    manifest_hash: str
    created_at: float


class PlanEntry(_Record):
    id: str
    name: str
    state: str | None = None
    changes: dict[str, list[Any]] = Field(default_factory=dict, description="field: [old, new]")


class ReloadPlan(_Record):
    manifest_hash: str
    added: list[PlanEntry]
    kept: list[PlanEntry]
    changed: list[PlanEntry]
    removed: list[PlanEntry]
    applied: bool
    warnings: list[str] = Field(
        default_factory=list,
        description="suspicious but valid: host patterns that match no job, renamed keys",
    )
    runs: list[PlanEntry] = Field(
        default_factory=list,
        description="collaborative runs; state: added, kept, changed (scheduling, or a new"
        " identity under the same name: the old run is superseded) or removed (paused)",
    )
    pipelines: list[PlanEntry] = Field(
        default_factory=list,
        description="pipelines; state: added, kept, changed (scheduling, or a new identity"
        " under the same name: changes.id = [old, new]), superseded (the old one) or removed",
    )


class JobRef(_Record):
    """A short reference to a job, e.g. another job with the same name."""

    id: str
    name: str
    state: JobState
    in_manifest: bool
    created_at: float


class JobQueue(abc.ABC):
    """The queue contract. Backends: ``SQLiteQueue`` (Postgres arrives in its own issue)."""

    settings: QueueSettings
    clock: Callable[[], float]
    # Whether a claim first reaps lost attempts (``reap``). A coordinator turns it off: its
    # leader's reaper flushes the heartbeat book before each pass, and a claim's reap would
    # not (it would requeue a job whose beats are in the book, unflushed), nor would it skip
    # a pass after a wall-clock step or run only on the leader.
    reap_on_claim: bool = True

    # operator ------------------------------------------------------------------------
    @abc.abstractmethod
    def apply_manifest(self, manifest: Manifest, *, dry_run: bool = False) -> ReloadPlan:
        """Reload: add new jobs, update scheduling of existing ones, mark removed ones."""

    @abc.abstractmethod
    def cancel(self, job_id: str, reason: str = "cancelled by operator") -> JobRecord: ...

    @abc.abstractmethod
    def requeue(self, job_id: str, reason: str = "requeued by operator") -> JobRecord: ...

    def add_job(self, spec: JobSpec) -> JobRecord:
        """Submit one job into the live queue, kept across reloads (``queue.sqlite_submit``):
        ``Conflict`` for a name or identity already taken, ``BadRequest`` for an ``after``
        name no job answers to."""
        raise NotImplementedError

    def resolve_dependencies(self) -> int:
        """The dependency step (``queue.deps``): release waiting jobs whose parents all
        completed, fail those with a failed, cancelled or missing parent (cascading); the
        number of jobs moved."""
        raise NotImplementedError

    # workers -------------------------------------------------------------------------
    @abc.abstractmethod
    def register_worker(self, capability: Capability) -> tuple[WorkerRecord, str]:
        """Register a worker; returns its record and its secret credential."""

    @abc.abstractmethod
    def authenticate_worker(self, token: str) -> str:
        """The worker id owning ``token``; raises ``Unauthorized``."""

    @abc.abstractmethod
    def deregister_worker(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    def enroll_host(self, name: str) -> str:
        """Enroll host ``name``; returns its join token (only its hash is kept)."""

    @abc.abstractmethod
    def rotate_host(
        self, name: str, *, revoke_workers: bool = False
    ) -> tuple[str, list[JobRecord]]:
        """A new join token for ``name``; the old one stops working at once. With
        ``revoke_workers`` its workers are revoked too: returns the token and the jobs
        requeued (none without it)."""

    @abc.abstractmethod
    def revoke_host(self, name: str) -> list[JobRecord]:
        """Revoke the host's enrollment and all its workers; returns the jobs requeued."""

    @abc.abstractmethod
    def revoke_worker(self, worker_id: str) -> list[JobRecord]:
        """Revoke one worker's credential; returns the jobs requeued (its active job)."""

    @abc.abstractmethod
    def list_hosts(self) -> list[HostRecord]: ...

    @abc.abstractmethod
    def authenticate_host(self, token: str) -> str:
        """The host a join token is enrolled for; ``Unauthorized`` if none or revoked."""

    @abc.abstractmethod
    def register_enrolled(self, capability: Capability, token: str) -> tuple[WorkerRecord, str]:
        """Register a worker with a host's join token, as that host; ``Unauthorized``,
        ``Forbidden`` if it claims another host."""

    @abc.abstractmethod
    def register_open(self, capability: Capability) -> tuple[WorkerRecord, str]:
        """Register a worker in open mode, as the policy-less host ``open:<claimed host>``."""

    @abc.abstractmethod
    def claim(self, worker_id: str) -> Claim | None:
        """Atomically claim the best job this worker may run, or None."""

    @abc.abstractmethod
    def heartbeat(self, job_id: str, worker_id: str, epoch: int) -> HeartbeatReply: ...

    @abc.abstractmethod
    def append_log(self, job_id: str, worker_id: str, epoch: int, lines: list[str]) -> int: ...

    @abc.abstractmethod
    def record_artifact(
        self, job_id: str, worker_id: str, epoch: int, sha256: str, size: int, name: str
    ) -> ArtifactRecord:
        """Bind an already-stored artifact to the attempt that produced it (fenced)."""

    @abc.abstractmethod
    def check_epoch(self, job_id: str, worker_id: str, epoch: int) -> JobRecord:
        """Raise ``StaleEpoch``/``Conflict`` unless this worker holds this epoch of the job."""

    @abc.abstractmethod
    def complete(
        self, job_id: str, worker_id: str, epoch: int, result: dict[str, Any]
    ) -> JobRecord: ...

    def claim_many(self, worker_id: str, max_jobs: int) -> list[Claim]:
        """Up to ``max_jobs`` claims at once, bounded by the worker's free slots."""
        got = self.claim(worker_id)
        return [got] if got is not None else []

    def complete_many(
        self, worker_id: str, items: list[tuple[str, int, dict[str, Any]]]
    ) -> list[JobRecord | ApiError]:
        """``complete`` each ``(job_id, epoch, result)``; an item refused gives its error in
        place of its record, and the others still complete."""
        out: list[JobRecord | ApiError] = []
        for job_id, epoch, result in items:
            try:
                out.append(self.complete(job_id, worker_id, epoch, result))
            except ApiError as err:
                out.append(err)
        return out

    def set_worker_slots(self, worker_id: str, slots: int) -> None:
        """How many active jobs the worker may hold (registration; default 1)."""
        raise NotImplementedError

    def ensure_shard_plan(self, job_id: str) -> None:
        """Plan the shards of the job's dataset, if it has one and no plan exists yet: slow
        (it streams the source), so the coordinator calls it on its threadpool before
        ``complete``, which then finds the plan made (``complete`` plans it itself if not)."""
        return None  # a backend without shard plans

    @abc.abstractmethod
    def fail(
        self,
        job_id: str,
        worker_id: str,
        epoch: int,
        error: str,
        *,
        retryable: bool = True,
        release: bool = False,
    ) -> JobRecord:
        """Record a failed attempt; ``release`` hands the job back without counting a failure."""

    @abc.abstractmethod
    def renew_leases(self) -> int:
        """Count a coordinator start as a heartbeat for every active job; returns how many.

        Without it, a coordinator that was down longer than the heartbeat timeout would, on
        restart, blame its own downtime on the workers and requeue jobs still running fine.
        """

    @abc.abstractmethod
    def reap(self) -> list[JobRecord]:
        """Requeue (or fail) active jobs whose heartbeats stopped or whose time ran out."""

    @abc.abstractmethod
    def heartbeat_many(self, beats: Sequence[Beat]) -> FlushResult:
        """Write the coordinator's batched heartbeats in one transaction (``queue.beats``)."""

    # data plane ----------------------------------------------------------------------
    @abc.abstractmethod
    def publish_router(self, fit_id: str, digest: str, body: dict[str, Any]) -> RouterRecord:
        """Store (or replace) the router workers are handed for ``fit_id``. Not trusted:
        workers with ``--verify-routing`` re-fit it and refuse a wrong one."""

    @abc.abstractmethod
    def get_router(self, fit_id: str) -> dict[str, Any]:
        """The published router's JSON for ``fit_id``; raises ``NotFound``."""

    # reads ---------------------------------------------------------------------------
    @abc.abstractmethod
    def get_job(self, ref: str) -> JobRecord:
        """A job by full id, unique id prefix, or name; raises ``NotFound``. A name that
        several jobs had (a reload made a new job of an edited one) resolves to the job in
        the current manifest; ``same_name`` lists the others."""

    @abc.abstractmethod
    def same_name(self, job_id: str) -> list[JobRef]:
        """The other jobs with this job's name, oldest first (empty when it is the only one)."""

    @abc.abstractmethod
    def list_jobs(self, state: str | None = None) -> list[JobRecord]: ...

    @abc.abstractmethod
    def events(self, job_id: str) -> list[Event]: ...

    @abc.abstractmethod
    def logs(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[LogLine]: ...

    @abc.abstractmethod
    def jobs_page(self, state: str, limit: int, *, newest_first: bool = False) -> list[JobRecord]:
        """At most ``limit`` jobs in ``state``, in queue order (or newest first): a bounded read
        for views that poll (the dashboard), where ``list_jobs`` would read every row."""

    @abc.abstractmethod
    def log_tail(self, job_id: str, limit: int) -> list[LogLine]:
        """A job's last ``limit`` log lines, oldest first."""

    @abc.abstractmethod
    def artifacts(self, job_id: str) -> list[ArtifactRecord]: ...

    @abc.abstractmethod
    def list_workers(self) -> list[WorkerRecord]: ...

    @abc.abstractmethod
    def explain(self, ref: str) -> dict[str, Any]:
        """Why a job is (not) running: requirements, eligible hosts online, per-host reasons."""

    @abc.abstractmethod
    def current_manifest_hash(self) -> str | None:
        """Digest of the last manifest applied, None before the first."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of jobs in each state."""

    # fair share (queue.fairshare) ------------------------------------------------------
    @abc.abstractmethod
    def fair_share_tick(self) -> FairShareState:
        """The leader's tick: charge running attempts, recompute levels, rewrite stale ones."""

    @abc.abstractmethod
    def fair_share(self) -> FairShareReport:
        """Every submitter's decayed usage, share, factor and level now."""

    @abc.abstractmethod
    def is_bound(self, sha256: str) -> bool:
        """Whether any artifact record, a run's weights or momentum, a market model, or a
        pipeline's teacher model names this digest (the artifact GC keeps it)."""

    # collaborative runs (records: queue.runs_base; round rules: coordinator.rounds) --------
    @abc.abstractmethod
    def list_runs(self) -> list[RunRecord]: ...

    @abc.abstractmethod
    def get_run(self, ref: str) -> RunRecord:
        """A run by id, or by name (the newest run of that name); ``NotFound``."""

    @abc.abstractmethod
    def run_rounds(self, run_id: str) -> list[RoundRecord]: ...

    @abc.abstractmethod
    def run_contributions(self, run_id: str) -> list[ContributionRecord]: ...

    @abc.abstractmethod
    def runs_to_open(self) -> list[RunRecord]:
        """Active runs whose first round is not opened yet (new in a reload)."""

    @abc.abstractmethod
    def open_first_round(
        self, run_id: str, weights: str, weights_size: int, tasks: list[JobSpec]
    ) -> bool:
        """Open round 0 with these weights and replica tasks; False if already open."""

    @abc.abstractmethod
    def open_rounds(self) -> list[RoundStatus]:
        """The open round of every active run, with its contributions and task states."""

    @abc.abstractmethod
    def complete_replica(
        self, job_id: str, worker_id: str, epoch: int, result: dict[str, Any], verdict: Verdict
    ) -> JobRecord:
        """Complete a replica attempt and record its contribution in one transaction. The
        same completion again (its reply was lost) records nothing more."""

    @abc.abstractmethod
    def close_round(self, outcome: RoundOutcome) -> bool:
        """Write a round's close; False (nothing written) if it is no longer open."""

    @abc.abstractmethod
    def note_round(self, run_id: str, round: int, detail: str) -> None:
        """Record why an open round is still open (e.g. timed out below quorum)."""

    @abc.abstractmethod
    def weights_round(self, sha256: str) -> tuple[str, int] | None:
        """(run id, round) of the newest round that started from these weights, or None."""

    @abc.abstractmethod
    def holds_weights(self, worker_id: str, sha256: str) -> bool:
        """Whether the worker holds an active replica task that starts from these weights."""

    @abc.abstractmethod
    def add_bytes_down(self, run_id: str, round: int, num_bytes: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    # attestation of the private tier (queue.sqlite_attest, verify.attest) ---------------
    @abc.abstractmethod
    def attest_nonce(self, worker_id: str, ttl_s: float) -> str:
        """A fresh single-use nonce for ``worker_id``, valid ``ttl_s``."""

    @abc.abstractmethod
    def check_attest_nonce(self, worker_id: str, nonce: str) -> None:
        """Refuse (``AttestationRefused``) a nonce that is unknown, another worker's,
        expired or used; writes nothing."""

    @abc.abstractmethod
    def attest_worker(self, worker_id: str, nonce: str, measurement: str, until: float) -> None:
        """Consume the nonce (checked again) and mark the worker attested until ``until``."""

    @abc.abstractmethod
    def end_attestations_except(self, measurements: Sequence[str]) -> int:
        """End the attestations whose measurement is not allowed any more; how many."""

    # the training market (queue.sqlite_market, verify.market) ---------------------------
    @abc.abstractmethod
    def create_competition(
        self, spec: CompetitionSpec, baseline_sha: str, baseline_score: float
    ) -> CompetitionRecord:
        """A new competition whose frontier is its baseline; ``Conflict`` if named already."""

    @abc.abstractmethod
    def get_competition(self, ref: str) -> CompetitionRecord:
        """A competition by name or id; ``NotFound``."""

    @abc.abstractmethod
    def list_competitions(self) -> list[CompetitionRecord]: ...

    @abc.abstractmethod
    def submit(
        self,
        competition_id: str,
        sha256: str,
        size: int,
        producer: str,
        claim: float,
        tasks: list[JobSpec],
        *,
        submission_id: str | None = None,
    ) -> SubmissionRecord:
        """Record a submission with its referee jobs (``tasks``) in one transaction, or as a
        ``duplicate`` (no jobs, pays nothing) when its model was submitted before."""

    @abc.abstractmethod
    def get_submission(self, ref: str) -> SubmissionRecord:
        """A submission by id or unambiguous id prefix, with its referee reports."""

    @abc.abstractmethod
    def list_submissions(self, competition_id: str) -> list[SubmissionRecord]: ...

    @abc.abstractmethod
    def refereeing_submissions(self) -> list[SubmissionRecord]:
        """Every submission still waiting for its panel, oldest first."""

    @abc.abstractmethod
    def panel_jobs(self, submission_id: str) -> list[JobRecord]:
        """The referee jobs of a submission."""

    @abc.abstractmethod
    def holds_model(self, worker_id: str, sha256: str) -> bool:
        """Whether the worker holds an active referee job naming this model."""

    @abc.abstractmethod
    def record_referee_report(
        self, job_id: str, epoch: int, report: RefereeReport
    ) -> SubmissionRecord:
        """Store a referee job's report for its panel slot (again: no change)."""

    @abc.abstractmethod
    def decide(self, submission_id: str, verdict: PanelVerdict, paid: float) -> SubmissionRecord:
        """Write the verdict, and for ``paid > 0`` the ledger row and the frontier move, in
        one transaction; a decided submission is returned unchanged (pays once)."""

    @abc.abstractmethod
    def ledger(self, competition_id: str | None = None) -> list[LedgerEntry]: ...

    @abc.abstractmethod
    def balances(self, competition_id: str | None = None) -> dict[str, float]:
        """Credits paid to each account, summed from the ledger."""

    # disaggregated pipelines (queue.sqlite_pipelines, queue.sqlite_pipeline_refs) -------
    def list_pipelines(self) -> list[PipelineRecord]:
        raise NotImplementedError

    def get_pipeline(self, ref: str) -> PipelineRecord:
        """A pipeline by id, or by name (the newest of that name); ``NotFound``."""
        raise NotImplementedError

    def pipeline_counts(self, pipeline_id: str) -> PipelineCounts:
        raise NotImplementedError

    def pipeline_jobs(self, pipeline_id: str) -> list[JobRecord]:
        raise NotImplementedError

    def pipelines_to_drive(self) -> list[PipelineRecord]:
        """Pipelines waiting for their teacher's model or producing."""
        raise NotImplementedError

    def start_pipeline(self, pipeline_id: str, teacher_model: str) -> PipelineRecord:
        """Record the teacher's model and insert the producer and consumer jobs."""
        raise NotImplementedError

    def fail_pipeline(self, pipeline_id: str, reason: str) -> PipelineRecord:
        """End the pipeline as failed; its unfinished jobs are cancelled."""
        raise NotImplementedError

    def ensure_consumers(self, pipeline_id: str) -> int:
        """Consumer jobs 0..consumers-1 exist; pending ones beyond are cancelled."""
        raise NotImplementedError

    def pipeline_attempt(self, job_id: str, epoch: int) -> tuple[JobRecord, PipelineRecord, str]:
        """The current attempt's job, its pipeline and the pipeline's secret (hex);
        ``StaleEpoch`` unless ``epoch`` is the job's active attempt."""
        raise NotImplementedError

    def publish_samples(self, job_id: str, epoch: int, refs: list[dict[str, Any]]) -> PublishReply:
        raise NotImplementedError

    def lease_samples(self, job_id: str, epoch: int, max_samples: int) -> LeaseReply:
        raise NotImplementedError

    def ack_samples(self, job_id: str, epoch: int, acks: list[tuple[str, int]]) -> list[AckResult]:
        raise NotImplementedError

    def return_samples(self, job_id: str, epoch: int, sample_ids: list[str]) -> int:
        raise NotImplementedError

    def producer_sync(self, job_id: str, epoch: int, released: list[str]) -> ProducerSync:
        raise NotImplementedError

    def settle_pipelines(self, now: float | None = None) -> int:
        """Apply the ref queue's time and attempt rules; the rows changed."""
        raise NotImplementedError

    def pipeline_secret(self, pipeline_id: str) -> str:
        raise NotImplementedError

    def pipeline_attempt_key(self, pipeline_id: str) -> str:
        """The key of its jobs' attempt tokens (hex); never handed to a job."""
        raise NotImplementedError
