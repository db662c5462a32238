"""The job queue on SQL: ``SQLQueue`` over a ``db.Database``, SQLite or PostgreSQL.

Every state change runs inside a write transaction (``db.tx()``) that serializes it against
every other: ``BEGIN IMMEDIATE`` on SQLite (one coordinator process), an exclusive advisory
lock on PostgreSQL (any number of coordinators on one database). So a read-check-write is
atomic: a fenced write can never interleave with a requeue. Claims, the heartbeat flush and
plain completions share the lock on PostgreSQL: a claim takes its row ``FOR UPDATE SKIP
LOCKED`` (``claims._lock_pending``), so two workers still never claim the same job, and a
completion locks its job's row before it reads it (``SQLQueue._completing``).

``SQLQueue`` owns the transactions and answers the reads; the writes live beside it as plain
functions on a ``db.Conn`` (the modules keep their ``sqlite_`` names; their SQL is the neutral
subset both engines accept): ``sqlite_operator`` (reload, cancel, requeue), ``sqlite_workers``
(the worker registry) and ``sqlite_attempts`` (claim, fenced reports, complete/fail, reaping).
The schema is ``migrations``'s, applied when the queue opens. ``SQLiteQueue(path)`` and
``PostgresQueue(url)`` open the two backends.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from trainfleet.capability.model import Capability
from trainfleet.data.spec import dataset_digest
from trainfleet.errors import ApiError
from trainfleet.manifest.spec import JobSpec, Manifest
from trainfleet.queue import (
    deps,
    fairshare,
    sqlite_attempts,
    sqlite_attest,
    sqlite_data,
    sqlite_hosts,
    sqlite_market,
    sqlite_operator,
    sqlite_runs,
    sqlite_submit,
    sqlite_workers,
)
from trainfleet.queue.base import (
    ArtifactRecord,
    Claim,
    Event,
    HeartbeatReply,
    HostRecord,
    JobQueue,
    JobRecord,
    JobRef,
    LogLine,
    QueueSettings,
    ReloadPlan,
    RouterRecord,
    WorkerRecord,
)
from trainfleet.queue.beats import Beat, FlushResult, heartbeat_many, renew
from trainfleet.queue.checkpoint import Checkpointer
from trainfleet.queue.claims import claim_many
from trainfleet.queue.db import (
    Conn,
    Database,
    PostgresDatabase,
    SQLiteDatabase,
    StatementConn,
)
from trainfleet.queue.explain import explain_job
from trainfleet.queue.fleet_cache import FleetCache
from trainfleet.queue.ledger import shard_reports
from trainfleet.queue.market_base import CompetitionRecord, LedgerEntry, SubmissionRecord
from trainfleet.queue.migrations import migrate
from trainfleet.queue.runs_base import (
    ContributionRecord,
    RoundOutcome,
    RoundRecord,
    RoundStatus,
    RunRecord,
    Verdict,
)
from trainfleet.queue.shard_plans import plan_expected_shards
from trainfleet.queue.sqlite_pipelines_queue import PIPELINE_BOUND, PipelineMethods
from trainfleet.queue.sqlite_schema import (
    EventRow,
    artifact_record,
    event_record,
    find_job_row,
    insert_events,
    job_record,
    log_line,
    read_hosts,
    read_meta,
    same_name_refs,
    worker_record,
)
from trainfleet.verify.market import CompetitionSpec
from trainfleet.verify.panel import RefereeReport
from trainfleet.verify.panel import Verdict as PanelVerdict

T = TypeVar("T")

SEEN_EVERY_S = 1.0  # a worker's heartbeats write its last_seen at most this often
MAX_SEEN = 100_000  # workers remembered for that (then forgotten all at once)


class SQLQueue(PipelineMethods, JobQueue):
    """The queue on one ``Database`` (it upgrades the schema on open). ``clock`` is
    injectable so tests control time."""

    def __init__(
        self,
        db: Database,
        settings: QueueSettings | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.db = db
        self.settings = settings or QueueSettings()
        self.clock = clock
        self._plan_lock = threading.Lock()
        self._deps_watch = deps.Watch()
        self._reads = StatementConn(db)
        self.fleet = FleetCache()  # the claim's view of workers and host policies
        self._seen: dict[str, float] = {}  # worker -> when a heartbeat last marked it seen
        self.run_again_alone = 0  # shared transactions aborted for a deadlock, run again
        try:
            migrate(db)
        except BaseException:
            db.close()
            raise

    # connections & transactions ---------------------------------------------------------
    def _conn(self) -> Conn:
        """Reads outside a transaction, one statement at a time (each sees the latest
        commit); safe from any thread."""
        return self._reads

    def _tx(self, *, shared: bool = False, defer: bool = False) -> AbstractContextManager[Conn]:
        return self.db.tx(shared=shared, defer=defer)

    def _later(self) -> sqlite_attempts.Later | None:
        """Where a claim or completion in a group commit leaves its events and charges
        (``SQLiteDatabase.group``); None: write them at once."""
        deferred = self.db.deferred()
        return deferred if isinstance(deferred, sqlite_attempts.Later) else None

    def close(self) -> None:
        self.db.close()

    # operator ---------------------------------------------------------------------------
    def apply_manifest(self, manifest: Manifest, *, dry_run: bool = False) -> ReloadPlan:
        with self._tx() as conn:
            plan = sqlite_operator.apply_manifest(conn, manifest, self.clock, dry_run=dry_run)
        self.fleet.invalidate()  # host policies may have changed
        return plan

    def cancel(self, job_id: str, reason: str = "cancelled by operator") -> JobRecord:
        with self._tx() as conn:
            return sqlite_operator.cancel(conn, job_id, reason, self.clock)

    def requeue(self, job_id: str, reason: str = "requeued by operator") -> JobRecord:
        with self._tx() as conn:
            return sqlite_operator.requeue(conn, job_id, reason, self.clock)

    def add_job(self, spec: JobSpec) -> JobRecord:
        with self._tx() as conn:
            return sqlite_submit.add_job(conn, spec, self.clock)

    def resolve_dependencies(self) -> int:
        top = None
        if not self.db.single_writer:
            # PostgreSQL: completions commit side by side, so an event can become visible
            # after one with a higher seq. The watch's newest seq is read under the exclusive
            # lock, which no shared writer holds: every seq below it has committed. Only that
            # read: the plan below reads without the lock.
            with self._tx() as conn:
                top = deps.newest_seq(conn)
        # Looked at without the write lock first: most steps find nothing to move, and most
        # need not look at all (nothing that could move a waiting job happened).
        reads = self._conn()
        if not self._deps_watch.due(reads, self.clock(), top) or not deps.plan_moves(reads):
            return 0
        with self._tx() as conn:
            return deps.resolve(conn, self.clock)

    # workers ----------------------------------------------------------------------------
    def register_worker(self, capability: Capability) -> tuple[WorkerRecord, str]:
        with self._tx() as conn:
            return sqlite_workers.register_worker(
                conn, capability, self.clock, self.settings.offline_after_s
            )

    def authenticate_worker(self, token: str) -> str:
        return sqlite_workers.authenticate_worker(self._conn(), token)

    def deregister_worker(self, worker_id: str) -> None:
        with self._tx() as conn:
            sqlite_workers.deregister_worker(conn, worker_id, self.clock())
        self.fleet.invalidate(worker_id)

    # hosts: enrollment and revocation (sqlite_hosts) ------------------------------------
    def enroll_host(self, name: str) -> str:
        with self._tx() as conn:
            return sqlite_hosts.enroll_host(conn, name, self.clock())

    def rotate_host(
        self, name: str, *, revoke_workers: bool = False
    ) -> tuple[str, list[JobRecord]]:
        with self._tx() as conn:
            out = sqlite_hosts.rotate_host(conn, name, self.clock(), revoke_workers=revoke_workers)
        self.fleet.invalidate()
        return out

    def revoke_host(self, name: str) -> list[JobRecord]:
        with self._tx() as conn:
            out = sqlite_hosts.revoke_host(conn, name, self.clock())
        self.fleet.invalidate()
        return out

    def revoke_worker(self, worker_id: str) -> list[JobRecord]:
        with self._tx() as conn:
            out = sqlite_hosts.revoke_worker(conn, worker_id, self.clock())
        self.fleet.invalidate(worker_id)
        return out

    def list_hosts(self) -> list[HostRecord]:
        return sqlite_hosts.list_hosts(self._conn(), self.clock(), self.settings.offline_after_s)

    def authenticate_host(self, token: str) -> str:
        return sqlite_hosts.authenticate_host(self._conn(), token)

    def register_enrolled(self, capability: Capability, token: str) -> tuple[WorkerRecord, str]:
        with self._tx() as conn:
            return sqlite_hosts.register_enrolled(
                conn, capability, token, self.clock, self.settings.offline_after_s
            )

    def register_open(self, capability: Capability) -> tuple[WorkerRecord, str]:
        with self._tx() as conn:
            return sqlite_hosts.register_open(
                conn, capability, self.clock, self.settings.offline_after_s
            )

    # attempts ---------------------------------------------------------------------------
    def claim(self, worker_id: str) -> Claim | None:
        got = self.claim_many(worker_id, 1)
        return got[0] if got else None

    def claim_many(
        self, worker_id: str, max_jobs: int, *, starts: Sequence[Beat] = ()
    ) -> list[Claim]:
        """Up to ``max_jobs`` claims, bounded by the worker's free slots (``claims``).
        ``starts``: the worker's first beats still in the coordinator's heartbeat book,
        written first in the same transaction (``queue.beats.renew``)."""
        if self.reap_on_claim:
            self.reap()
        # In a group commit the claims' events may join the group's (``SQLiteDatabase.group``);
        # first beats written here (``renew``) come after what the group left, in order.
        with self._tx(shared=True, defer=not starts) as conn:
            if starts:
                renew(conn, starts)
            return claim_many(
                conn,
                worker_id,
                self.clock,
                self.settings,
                max_jobs,
                fleet=self.fleet,
                later=self._later(),
            )

    def set_worker_slots(self, worker_id: str, slots: int) -> None:
        with self._tx() as conn:
            sqlite_workers.set_slots(conn, worker_id, slots)

    def check_epoch(self, job_id: str, worker_id: str, epoch: int) -> JobRecord:
        return job_record(sqlite_attempts.fenced(self._conn(), job_id, worker_id, epoch))

    def heartbeat(self, job_id: str, worker_id: str, epoch: int) -> HeartbeatReply:
        """A heartbeat marks its worker seen at most once every ``SEEN_EVERY_S`` (a write to
        the worker's row, the third of a claim cycle's on the workers table): ``last_seen``
        is kept to that resolution, far finer than any timeout that reads it. A revoked
        worker's beat is still refused by the fence: revoking requeues its jobs."""
        with self._tx() as conn:
            now = self.clock()
            touched = now - self._seen.get(worker_id, -math.inf) < SEEN_EVERY_S
            if not touched:
                sqlite_workers.touch(conn, worker_id, now)
                if len(self._seen) >= MAX_SEEN:
                    self._seen.clear()
                self._seen[worker_id] = now
            return sqlite_attempts.heartbeat(
                conn, job_id, worker_id, epoch, self.clock, touched=True
            )

    def heartbeat_each(
        self, worker_id: str, items: list[tuple[str, int]]
    ) -> list[HeartbeatReply | ApiError]:
        """``heartbeat`` for each ``(job_id, epoch)`` in one transaction, as if each were in its
        own savepoint (``sqlite_attempts.each_item``): a beat refused (fenced, not found) is
        rolled back alone and returned as its error."""
        with self._tx() as conn:
            touched: list[bool] = []  # the worker is marked seen once for the whole batch
            events: list[EventRow] = []  # and a clean batch's events written at once

            def one(item: tuple[str, int]) -> HeartbeatReply:
                if not touched:
                    sqlite_workers.touch(conn, worker_id, self.clock())
                    touched.append(True)
                return sqlite_attempts.heartbeat(
                    conn, item[0], worker_id, item[1], self.clock, touched=True, events=events
                )

            def alone(item: tuple[str, int]) -> HeartbeatReply:
                events.clear()  # the batch was rolled back: each item now writes its own
                return sqlite_attempts.heartbeat(conn, item[0], worker_id, item[1], self.clock)

            out = sqlite_attempts.each_item(conn, items, one, alone)
            insert_events(conn, events)
            return out

    def append_log(self, job_id: str, worker_id: str, epoch: int, lines: list[str]) -> int:
        with self._tx() as conn:
            return sqlite_attempts.append_log(conn, job_id, worker_id, epoch, lines, self.clock)

    def record_artifact(
        self, job_id: str, worker_id: str, epoch: int, sha256: str, size: int, name: str
    ) -> ArtifactRecord:
        with self._tx() as conn:
            return sqlite_attempts.record_artifact(
                conn, job_id, worker_id, epoch, sha256, size, name, self.clock
            )

    def complete(
        self, job_id: str, worker_id: str, epoch: int, result: dict[str, Any]
    ) -> JobRecord:
        self.ensure_shard_plan(job_id)
        with self._tx() as conn:
            return sqlite_attempts.complete(conn, job_id, worker_id, epoch, result, self.clock)

    def complete_plain(
        self,
        job_ref: str,
        worker_id: str,
        epoch: int,
        result: dict[str, Any],
        start: Beat | None = None,
    ) -> tuple[JobRecord, JobRecord | None]:
        """The coordinator's completion in one transaction (``sqlite_attempts.complete_plain``):
        ``(job, record)``, record None for a job whose completion needs slow work first."""
        return self._completing(
            [result],
            lambda conn: sqlite_attempts.complete_plain(
                conn, job_ref, worker_id, epoch, result, self.clock, start, self._later()
            ),
            defer=True,  # in a group commit: events, slot and charge with the group's
        )

    def complete_plain_many(
        self,
        worker_id: str,
        items: list[tuple[str, int, dict[str, Any]]],
        starts: dict[str, Beat],
    ) -> list[tuple[JobRecord, JobRecord | None] | ApiError]:
        """``complete_plain`` for a batch, in one transaction (one savepoint per item)."""
        return self._completing(
            [result for _, _, result in items],
            lambda conn: sqlite_attempts.complete_plain_many(
                conn, worker_id, items, self.clock, starts
            ),
        )

    def _completing(
        self, results: list[dict[str, Any]], write: Callable[[Conn], T], *, defer: bool = False
    ) -> T:
        """A plain completion's transaction. On PostgreSQL it shares the write lock, as claims
        do (issue 9: completions waiting on each other for the exclusive lock held 64 workers
        to 250 cycles/s): it locks its job's row (``find_job_row(lock=True)``), frees its
        worker's slot and charges fair share by row-locked writes, and its events are not
        read until every shared writer is done (``resolve_dependencies``). A result that
        reports shard hashes takes the exclusive lock: its check reads other attempts'
        reports. Shared writers lock job rows in id order (a batch first locks all of its
        own: ``sqlite_attempts.complete_plain_many``); should PostgreSQL still abort one for
        a deadlock, it runs again under the exclusive lock, which waits for every other
        trainfleet writer to end: none can recur there (a session outside trainfleet locking
        rows by hand still can, and gets its error). On SQLite every transaction is
        exclusive."""
        if not any(shard_reports(result) for result in results):
            try:
                with self._tx(shared=True, defer=defer) as conn:
                    return write(conn)
            except self.db.lock_conflicts:  # rolled back: once more, alone
                self.run_again_alone += 1
        with self._tx() as conn:
            return write(conn)

    def complete_many(
        self,
        worker_id: str,
        items: list[tuple[str, int, dict[str, Any]]],
        *,
        starts: Sequence[Beat] = (),
    ) -> list[JobRecord | ApiError]:
        for job_id, _, _ in items:
            self.ensure_shard_plan(job_id)
        with self._tx() as conn:
            return sqlite_attempts.complete_many(conn, worker_id, items, self.clock, starts)

    def ensure_shard_plan(self, job_id: str) -> None:
        """Plan the shards of the job's dataset here, once per digest, before the completion's
        transaction: planning streams the source (bounded by ``shard_plan_budget_s``) and must
        not hold the write lock. One plan is made at a time."""
        dataset = sqlite_data.job_dataset(self._conn(), job_id)
        if dataset is None:
            return
        digest = dataset_digest(dataset)
        if sqlite_data.has_plan(self._conn(), digest):
            return
        with self._plan_lock:
            if sqlite_data.has_plan(self._conn(), digest):
                return
            plan = plan_expected_shards(dataset, self.settings.shard_plan_budget_s)
            with self._tx() as conn:
                sqlite_data.store_plan(conn, plan, self.clock())

    def publish_router(self, fit_id: str, digest: str, body: dict[str, Any]) -> RouterRecord:
        with self._tx() as conn:
            return sqlite_data.publish_router(conn, fit_id, digest, body, self.clock())

    def get_router(self, fit_id: str) -> dict[str, Any]:
        return sqlite_data.get_router(self._conn(), fit_id)

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
        with self._tx() as conn:
            return sqlite_attempts.fail(
                conn,
                job_id,
                worker_id,
                epoch,
                error,
                self.clock,
                retryable=retryable,
                release=release,
            )

    def renew_leases(self) -> int:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET heartbeat_at = ? WHERE state IN ('claimed', 'running')",
                (self.clock(),),
            )
            return cur.rowcount

    def reap(self) -> list[JobRecord]:
        now = self.clock()
        timeout_s = self.settings.heartbeat_timeout_s
        # Cheap check outside the write lock; most calls find nothing.
        overdue = sqlite_attempts.overdue_jobs(self._conn(), now, timeout_s)
        if not overdue:
            return []
        with self._tx() as conn:
            return sqlite_attempts.reap_jobs(conn, overdue, now, timeout_s, self.clock)

    # reads ------------------------------------------------------------------------------
    def get_job(self, ref: str) -> JobRecord:
        return job_record(find_job_row(self._conn(), ref))

    def same_name(self, job_id: str) -> list[JobRef]:
        return same_name_refs(self._conn(), job_id)

    def list_jobs(self, state: str | None = None) -> list[JobRecord]:
        if state is None:
            rows = self._conn().execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        else:
            rows = (
                self._conn()
                .execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq", (state,))
                .fetchall()
            )
        return [job_record(r) for r in rows]

    def events(self, job_id: str) -> list[Event]:
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM events WHERE job_seq = (SELECT seq FROM jobs WHERE id = ?)"
                " AND job_id = ? ORDER BY seq",
                (job_id, job_id),
            )
            .fetchall()
        )
        return [event_record(r) for r in rows]

    def logs(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[LogLine]:
        rows = (
            self._conn()
            .execute(
                "SELECT seq, attempt, epoch, at, line FROM logs WHERE job_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (job_id, after_seq, limit),
            )
            .fetchall()
        )
        return [log_line(r) for r in rows]

    def jobs_page(self, state: str, limit: int, *, newest_first: bool = False) -> list[JobRecord]:
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT * FROM jobs WHERE state = ? ORDER BY seq {order} LIMIT ?"
        return [job_record(r) for r in self._conn().execute(sql, (state, limit)).fetchall()]

    def log_tail(self, job_id: str, limit: int) -> list[LogLine]:
        rows = (
            self._conn()
            .execute(
                "SELECT seq, attempt, epoch, at, line FROM logs WHERE job_id = ?"
                " ORDER BY seq DESC LIMIT ?",
                (job_id, limit),
            )
            .fetchall()
        )
        return [log_line(r) for r in reversed(rows)]

    def artifacts(self, job_id: str) -> list[ArtifactRecord]:
        rows = (
            self._conn()
            .execute("SELECT * FROM artifacts WHERE job_id = ? ORDER BY id", (job_id,))
            .fetchall()
        )
        return [artifact_record(r) for r in rows]

    def is_bound(self, sha256: str) -> bool:
        sql = "SELECT 1 FROM artifacts WHERE sha256 = ? LIMIT 1"
        conn = self._conn()
        return (
            conn.execute(sql, (sha256,)).fetchone() is not None
            or sqlite_runs.is_bound(conn, sha256)
            or conn.execute(MARKET_BOUND, (sha256,) * 3).fetchone() is not None
            or conn.execute(PIPELINE_BOUND, (sha256,)).fetchone() is not None
        )

    def list_workers(self) -> list[WorkerRecord]:
        conn = self._conn()
        hosts = read_hosts(conn)
        rows = conn.execute("SELECT * FROM workers ORDER BY registered_at").fetchall()
        return [worker_record(r, hosts, self.clock, self.settings.offline_after_s) for r in rows]

    def explain(self, ref: str) -> dict[str, Any]:
        conn = self._conn()
        job = job_record(find_job_row(conn, ref))
        hosts = read_hosts(conn)
        now = self.clock()
        out = explain_job(
            job,
            candidates=sqlite_workers.candidates(
                conn, hosts, now, self.settings.idle_window_s, self.settings.offline_after_s
            ),
            hosts=hosts,
            prefer_cuda_wait_s=float(read_meta(conn, "prefer_cuda_wait_s", "30")),
            now=now,
            attested=sqlite_market.attested_workers(conn, now),
            panel_hosts=sqlite_market.panel_hosts(conn, job.spec.panel, job.id),
            waiting=deps.waiting_text(deps.waiting_for(conn, job.spec.after))
            if job.state == "waiting"
            else "",
        )
        if job.state in ("pending", "waiting"):  # its place among the jobs of its priority
            note = fairshare.note(conn, job.spec.submitter, job.priority, now)
            out["message"] = f"{out['message']}\n{note}"
        return out

    def current_manifest_hash(self) -> str | None:
        value = read_meta(self._conn(), "manifest_hash", "")
        return value or None

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    # fair share (queue.fairshare) -------------------------------------------------------
    def fair_share_tick(self) -> fairshare.FairShareState:
        with self._tx() as conn:
            return fairshare.tick(conn, self.clock())

    def fair_share(self) -> fairshare.FairShareReport:
        return fairshare.report(self._conn(), self.clock())

    # collaborative runs (sqlite_runs) ---------------------------------------------------
    def list_runs(self) -> list[RunRecord]:
        rows = self._conn().execute("SELECT * FROM runs ORDER BY seq").fetchall()
        return [sqlite_runs.run_record(r) for r in rows]

    def get_run(self, ref: str) -> RunRecord:
        return sqlite_runs.get_run(self._conn(), ref)

    def run_rounds(self, run_id: str) -> list[RoundRecord]:
        rows = self._conn().execute(
            "SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run_id,)
        )
        return [sqlite_runs.round_record(r) for r in rows]

    def run_contributions(self, run_id: str) -> list[ContributionRecord]:
        rows = self._conn().execute(
            "SELECT * FROM contributions WHERE run_id = ? ORDER BY round, replica, created_at",
            (run_id,),
        )
        return [sqlite_runs.contribution_record(r) for r in rows]

    def runs_to_open(self) -> list[RunRecord]:
        return sqlite_runs.runs_to_open(self._conn())

    def open_first_round(
        self, run_id: str, weights: str, weights_size: int, tasks: list[JobSpec]
    ) -> bool:
        with self._tx() as conn:
            return sqlite_runs.open_first_round(
                conn, run_id, weights, weights_size, tasks, self.clock()
            )

    def open_rounds(self) -> list[RoundStatus]:
        return sqlite_runs.open_rounds(self._conn())

    def complete_replica(
        self, job_id: str, worker_id: str, epoch: int, result: dict[str, Any], verdict: Verdict
    ) -> JobRecord:
        self.ensure_shard_plan(job_id)
        with self._tx() as conn:
            return sqlite_runs.complete_replica(
                conn, job_id, worker_id, epoch, result, verdict, self.clock
            )

    def close_round(self, outcome: RoundOutcome) -> bool:
        with self._tx() as conn:
            return sqlite_runs.close_round(conn, outcome, self.clock)

    def note_round(self, run_id: str, round: int, detail: str) -> None:
        with self._tx() as conn:
            sqlite_runs.note_round(conn, run_id, round, detail)

    def weights_round(self, sha256: str) -> tuple[str, int] | None:
        return sqlite_runs.weights_round(self._conn(), sha256)

    def holds_weights(self, worker_id: str, sha256: str) -> bool:
        return sqlite_runs.holds_weights(self._conn(), worker_id, sha256)

    def add_bytes_down(self, run_id: str, round: int, num_bytes: int) -> None:
        with self._tx() as conn:
            sqlite_runs.add_bytes_down(conn, run_id, round, num_bytes)

    # liveness (queue.beats) -------------------------------------------------------------
    def heartbeat_many(self, beats: Sequence[Beat]) -> FlushResult:
        with self._tx(shared=True) as conn:  # beside claims; never beside a requeue or reap
            return heartbeat_many(conn, beats, self.clock(), self.settings.offline_after_s)

    # attestation of the private tier (sqlite_attest) ------------------------------------
    def attest_nonce(self, worker_id: str, ttl_s: float) -> str:
        with self._tx() as conn:
            return sqlite_attest.issue_nonce(conn, worker_id, self.clock(), ttl_s)

    def check_attest_nonce(self, worker_id: str, nonce: str) -> None:
        sqlite_attest.check_nonce(self._conn(), worker_id, nonce, self.clock())

    def attest_worker(self, worker_id: str, nonce: str, measurement: str, until: float) -> None:
        with self._tx() as conn:
            sqlite_attest.attest_worker(conn, worker_id, nonce, measurement, until, self.clock())
        self.fleet.invalidate(worker_id)  # a claim's cached view of it may carry the old term

    def end_attestations_except(self, measurements: Sequence[str]) -> int:
        with self._tx() as conn:
            ended = sqlite_attest.end_attestations_except(conn, measurements)
        self.fleet.invalidate()
        return ended

    # the training market (sqlite_market) ------------------------------------------------
    def create_competition(
        self, spec: CompetitionSpec, baseline_sha: str, baseline_score: float
    ) -> CompetitionRecord:
        with self._tx() as conn:
            return sqlite_market.create_competition(
                conn, spec, baseline_sha, baseline_score, self.clock()
            )

    def get_competition(self, ref: str) -> CompetitionRecord:
        return sqlite_market.get_competition(self._conn(), ref)

    def list_competitions(self) -> list[CompetitionRecord]:
        return sqlite_market.list_competitions(self._conn())

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
        with self._tx() as conn:
            return sqlite_market.submit(
                conn, competition_id, sha256, size, producer, claim, tasks, self.clock(),
                submission_id,
            )  # fmt: skip

    def get_submission(self, ref: str) -> SubmissionRecord:
        return sqlite_market.get_submission(self._conn(), ref)

    def list_submissions(self, competition_id: str) -> list[SubmissionRecord]:
        return sqlite_market.list_submissions(self._conn(), competition_id)

    def refereeing_submissions(self) -> list[SubmissionRecord]:
        return sqlite_market.refereeing_submissions(self._conn())

    def panel_jobs(self, submission_id: str) -> list[JobRecord]:
        return sqlite_market.panel_jobs(self._conn(), submission_id)

    def holds_model(self, worker_id: str, sha256: str) -> bool:
        return sqlite_market.holds_model(self._conn(), worker_id, sha256)

    def record_referee_report(
        self, job_id: str, epoch: int, report: RefereeReport
    ) -> SubmissionRecord:
        with self._tx() as conn:
            return sqlite_market.record_referee_report(conn, job_id, epoch, report, self.clock())

    def decide(self, submission_id: str, verdict: PanelVerdict, paid: float) -> SubmissionRecord:
        with self._tx() as conn:
            return sqlite_market.decide(conn, submission_id, verdict, paid, self.clock())

    def ledger(self, competition_id: str | None = None) -> list[LedgerEntry]:
        return sqlite_market.ledger(self._conn(), competition_id)

    def balances(self, competition_id: str | None = None) -> dict[str, float]:
        return sqlite_market.balances(self._conn(), competition_id)


# The market's models the artifact GC keeps: every competition's baseline and frontier, and
# each submission still refereed or accepted (a rejected or duplicate one's bytes may go).
MARKET_BOUND = (
    "SELECT 1 FROM competitions WHERE baseline = ? OR frontier = ? UNION ALL SELECT 1 FROM"
    " submissions WHERE sha256 = ? AND state IN ('refereeing', 'accepted') LIMIT 1"
)


class SQLiteQueue(SQLQueue):
    """The queue on one SQLite file (WAL; one coordinator process)."""

    def __init__(
        self,
        path: str | Path,
        settings: QueueSettings | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.path = str(path)
        self._sqlite = SQLiteDatabase(self.path)
        self._checkpointer: Checkpointer | None = None
        super().__init__(self._sqlite, settings, clock)

    def checkpoint_in_background(self) -> None:
        """Checkpoint the WAL on a thread of its own, never inside a commit (``checkpoint``):
        the coordinator's writer then never waits on a checkpoint's fsync. Stopped by
        ``close``."""
        if self._checkpointer is None and self.path != ":memory:":
            self._checkpointer = Checkpointer(self._sqlite)
            self._checkpointer.start()

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        super().close()


class PostgresQueue(SQLQueue):
    """The queue on a PostgreSQL database (``postgresql://...``): any number of
    coordinators may share it. ``pool_size`` bounds this process's connections."""

    def __init__(
        self,
        url: str,
        settings: QueueSettings | None = None,
        clock: Callable[[], float] = time.time,
        *,
        pool_size: int = 10,
    ):
        super().__init__(PostgresDatabase(url, pool_size=pool_size), settings, clock)
