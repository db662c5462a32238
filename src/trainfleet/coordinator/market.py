"""The market driver: competitions, submissions and their referee panels, on live workers.

A competition (``verify.market.CompetitionSpec``) names a model family (GPT params), a
held-out dataset, a payout rate per nat of held-out loss reduction and a panel of ``n``
referees needing ``m``. The rule (issue 10): a score counts only when workers other than its
author re-measured it; the submitter's own claim is checked, never used for ranking or pay.

- **Create** (``create``): the baseline model (uploaded by sha256) must fit the family; the
  coordinator measures its held-out loss itself (``referee.heldout_score``, on the threadpool)
  and that is the first frontier score.
- **Submit** (``submit``): the model must be stored, fit the family and hold finite numbers
  (else 400 with the reason, before any referee runs). It is bytes a submitter uploaded, the
  ``model.safetensors`` a completed gpt train job wrote (``submit_job``: its producer is the
  job's host), or a run round's global weights (``submit_run``: producer ``"operator"``, the
  coordinator computed them); ``market_sources`` finds those. Then ONE queue transaction records the
  submission with its ``n`` referee jobs (``kind = "referee"``, a ``RefereeTask`` each; the
  claim rules put them on distinct enrolled hosts other than the producer's). A model already
  submitted to this competition (or its baseline or frontier) is a ``duplicate``: no referee
  runs and nothing is paid.
- **Reports**: a referee's completion carries per-window losses of the candidate and the
  frontier on its own seeded subset; the report (mean, interval, paired gate) is computed
  here from those numbers (``verify.panel.report_from_losses``), so a referee's summary is
  never trusted either. A referee job that failed for good counts as a report that vouches
  for nothing.
- **Decision**: once every slot of the panel has a report, ``verify.panel.judge`` gives the
  verdict and ``verify.market.payment`` the amount; ``queue.decide`` writes the verdict, the
  ledger row and the frontier move in one transaction (paying once is a database fact: the
  ledger's ``UNIQUE(submission_id)``).

Determinism makes restarts safe: reports are a pure function of stored job results (the
bootstrap is seeded), so the driver's ``tick`` (every ``TICK_S`` and after each referee
completion) recomputes whatever a dead coordinator left unrecorded, and ``decide`` pays
nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trainfleet.coordinator import market_sources
from trainfleet.errors import BadRequest, Conflict, NotFound
from trainfleet.manifest.spec import JobSpec
from trainfleet.queue.base import JobRecord
from trainfleet.verify.market import OPERATOR, CompetitionSpec, payment
from trainfleet.verify.panel import RefereeReport, failed_report, judge, report_from_losses
from trainfleet.verify.spec import MAX_WINDOWS, RefereeTask

if TYPE_CHECKING:
    from torch import Tensor

    from trainfleet.coordinator.state import Coordinator
    from trainfleet.data.spec import DatasetSpec
    from trainfleet.queue.market_base import CompetitionRecord, SubmissionRecord
    from trainfleet.train.recipes import GPTParams

log = logging.getLogger(__name__)

TICK_S = 1.0
MAX_MODEL_BYTES = 1 << 30
"""The largest model file the market accepts (``PUT /v1/market/models``): far above any
family the coordinator can evaluate; a family's own bound (``model_bytes_limit``) is
applied at submission."""
HEADER_SLACK_BYTES = 1 << 16  # a safetensors header: names, shapes, offsets, metadata
REFEREE_TIMEOUT_S = 900.0  # one referee attempt: fetch two models, evaluate both
REFEREE_MAX_FAILURES = 2  # a referee job that fails twice counts as a failed report
TERMINAL = ("completed", "failed", "cancelled")

Weights = dict[str, "Tensor"]
Evaluate = Callable[["GPTParams", "DatasetSpec", Weights], float]


def subset_seed(submission_id: str, index: int) -> int:
    """The held-out subset seed of referee ``index`` of a submission: the coordinator's,
    different for every referee and submission, the same on every restart."""
    digest = hashlib.sha256(f"{submission_id}:{index}".encode()).hexdigest()
    return int(digest[:8], 16)


def model_bytes_limit(params: GPTParams) -> int:
    """The largest safetensors file of this family: its fp32 tensors and a header."""
    from trainfleet.train import inner

    return sum(t.numel() * 4 for t in inner.init_weights(params).values()) + HEADER_SLACK_BYTES


def referee_jobs(
    competition: CompetitionRecord,
    submission_id: str,
    candidate: str,
    producer: str,
) -> list[JobSpec]:
    """The ``n`` referee jobs of one submission, against the competition's current frontier."""
    spec: CompetitionSpec = competition.spec
    jobs = []
    for index in range(spec.referees):
        task = RefereeTask(
            submission_id=submission_id,
            competition_id=competition.id,
            index=index,
            candidate=candidate,
            frontier=competition.frontier,
            hyper=dict(spec.hyper),
            dataset=spec.dataset,
            windows=spec.windows,
            seed=subset_seed(submission_id, index),
            producer=producer,
        )
        jobs.append(
            JobSpec(
                name=f"{spec.name[:96]}.{submission_id[:12]}.referee{index}",
                kind="referee",
                model=spec.name,
                task=task,
                timeout_s=REFEREE_TIMEOUT_S,
                max_failures=REFEREE_MAX_FAILURES,
            )
        )
    return jobs


def referee_losses(result: dict[str, Any] | None) -> tuple[Any, Any, str]:
    """The loss arrays a referee's result carries (untrusted: anything JSON), and why they
    are missing ('' when present). ``null`` entries (non-finite losses) become NaN."""
    body = (result or {}).get("referee")
    if not isinstance(body, dict):
        return None, None, "the referee's result holds no 'referee' object"

    def losses(key: str) -> Any:
        values = body.get(key)
        if isinstance(values, list):
            return [math.nan if v is None else v for v in values]
        return values

    return losses("candidate_losses"), losses("frontier_losses"), ""


def _is_float(value: Any) -> bool:
    """Whether ``value`` is a JSON number a float holds: JSON integers are unbounded, and
    ``10**400`` taken as a loss made every report of its panel raise (it never decided)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def check_referee_losses(result: dict[str, Any]) -> None:
    """Refuse (400) a result whose ``referee`` object is not two equally long lists of at
    most ``MAX_WINDOWS`` numbers (``null`` for a non-finite one): a worker sending garbage
    hears so at once (its attempt fails and is retried). The lengths the task asked for are
    checked by the report itself (``report_from_losses``: a wrong length vouches for
    nothing)."""
    if "referee" not in result:
        return
    body = result["referee"]
    if not isinstance(body, dict):
        raise BadRequest("result.referee must be a JSON object")
    lengths = set()
    for key in ("candidate_losses", "frontier_losses"):
        values = body.get(key)
        if not isinstance(values, list) or len(values) > MAX_WINDOWS:
            raise BadRequest(f"result.referee.{key} must be a list of at most {MAX_WINDOWS} losses")
        if not all(v is None or _is_float(v) for v in values):
            raise BadRequest(
                f"result.referee.{key} must hold only numbers that are finite floats"
                " (null: a non-finite loss)"
            )
        lengths.add(len(values))
    if len(lengths) != 1:
        raise BadRequest("result.referee's two loss lists must be equally long (paired windows)")


class MarketDriver:
    """The market's side of one coordinator. ``evaluate`` (the baseline's held-out loss)
    is injectable; by default ``referee.heldout_score`` with a cache under ``runs_dir``."""

    def __init__(self, coord: Coordinator, evaluate: Evaluate | None = None):
        self.coord = coord
        self.evaluate: Evaluate = evaluate or self._heldout_loss
        self.lock = threading.Lock()
        self.wake: Callable[[], None] = lambda: None  # set by the app's ticker
        # A submission's id; its referees' subset seeds derive from it (``subset_seed``).
        self.new_id: Callable[[], str] = lambda: uuid.uuid4().hex
        self._family_bytes: dict[str, int] = {}  # competition id -> model_bytes_limit

    def submitter_upload_limit(self) -> int:
        """The largest model a host may upload: the largest family of any competition (0
        when there is none). A host's upload can only be worth something as a submission,
        so a gigabyte of bytes no family fits is refused at the door, not stored until the
        GC; the operator's uploads (a baseline for a competition yet to be created) are
        bounded by ``MAX_MODEL_BYTES`` alone."""
        limit = 0
        for competition in self.coord.queue.list_competitions():
            if competition.id not in self._family_bytes:
                params = competition.spec.params()
                self._family_bytes[competition.id] = model_bytes_limit(params)
            limit = max(limit, self._family_bytes[competition.id])
        return limit

    # models -------------------------------------------------------------------------------
    def load_model(self, spec: CompetitionSpec, sha256: str) -> Weights:
        """A stored model's tensors, checked against the family: 400 with the reason if it
        is not stored, too large, not safetensors, of other names/shapes/dtypes, or holds a
        non-finite number."""
        import safetensors.torch
        import torch

        from trainfleet.train import inner

        params = spec.params()
        store = self.coord.store
        if not store.exists(sha256):
            raise NotFound(
                f"no model {sha256} on the coordinator: upload it first"
                " (PUT /v1/market/models/{sha256}; `trainfleet market submit` does)"
            )
        size, limit = store.size(sha256), model_bytes_limit(params)
        if size > limit:
            raise BadRequest(
                f"model of {size} bytes does not fit competition {spec.name}'s family"
                f" (its safetensors file is at most {limit} bytes)"
            )
        try:
            weights = safetensors.torch.load(store.read_bytes(sha256))
        except Exception as err:  # SafetensorError, or anything a crafted header trips
            raise BadRequest(f"model {sha256[:12]} is not a safetensors file: {err}") from None
        try:
            inner.check_weights(params, weights)
        except inner.WeightsMismatch as err:
            raise BadRequest(
                f"model {sha256[:12]} does not fit competition {spec.name}'s family: {err}"
            ) from None
        broken = sorted(n for n, t in weights.items() if not bool(torch.isfinite(t).all()))
        if broken:
            raise BadRequest(f"model {sha256[:12]} holds non-finite numbers in {broken[:5]}")
        return weights

    def _heldout_loss(self, params: GPTParams, dataset: DatasetSpec, weights: Weights) -> float:
        """The competition's own definition of a held-out loss (``referee.heldout_score``:
        windows uniform over the whole held-out pool, what referees estimate)."""
        from trainfleet.data.prepare import CacheSettings
        from trainfleet.verify.referee import heldout_score

        assert self.coord.runs_dir is not None
        settings = CacheSettings(directory=self.coord.runs_dir / "eval-cache")
        return heldout_score(params, dataset, weights, settings)

    # the operator's and submitters' calls (threadpool) ------------------------------------
    def create(self, spec: CompetitionSpec, baseline: str) -> CompetitionRecord:
        """Create a competition: the baseline checked and scored by the coordinator itself."""
        queue = self.coord.queue
        try:
            queue.get_competition(spec.name)
        except NotFound:
            pass
        else:
            raise Conflict(f"a competition named {spec.name} exists already")
        weights = self.load_model(spec, baseline)
        score = self.evaluate(spec.params(), spec.dataset, weights)
        if not math.isfinite(score):
            raise BadRequest(f"the baseline's held-out loss is {score}: not a usable frontier")
        record = queue.create_competition(spec, baseline, score)
        log.info(
            "competition %s (%s): baseline %s scores %.4f",
            spec.name,
            record.id[:12],
            baseline[:12],
            score,
        )
        return record

    def submit_job(self, ref: str, job_ref: str, claim: float) -> SubmissionRecord:
        """Submit the model a completed gpt train job wrote (``model.safetensors`` in its
        packed artifact, read bounded by the family's size and stored content addressed).
        Its producer is the host of the job's accepted attempt: its referees avoid that
        host, and a payment goes to it."""
        queue = self.coord.queue
        competition = queue.get_competition(ref)
        job = market_sources.completed_train_job(queue, job_ref)
        if not job.host:
            raise BadRequest(f"job {job.name} ({job.id[:12]}) has no host on record")
        limit = model_bytes_limit(competition.spec.params())
        store, staging = self.coord.store, self.coord.staging_dir
        with market_sources.job_model(store, staging, job, limit) as sha256:
            return self.submit(competition.id, sha256, claim, job.host)

    def submit_run(self, ref: str, run_ref: str, round: int, claim: float) -> SubmissionRecord:
        """Submit a run's global weights at the start of ``round`` (one past its last round:
        its final weights). Their producer is ``"operator"``: the coordinator computed them
        (the outer step over many hosts' contributions), so any enrolled host may referee
        them, and a payment goes to the operator's account."""
        queue = self.coord.queue
        competition = queue.get_competition(ref)
        sha256 = market_sources.run_weights(queue, run_ref, round)
        return self.submit(competition.id, sha256, claim, OPERATOR)

    def submit(self, ref: str, sha256: str, claim: float, producer: str) -> SubmissionRecord:
        """Record a submission and queue its referee panel (or answer it as a duplicate)."""
        queue = self.coord.queue
        competition = queue.get_competition(ref)
        self.load_model(competition.spec, sha256)
        size = self.coord.store.size(sha256)
        submission_id = self.new_id()
        tasks = referee_jobs(competition, submission_id, sha256, producer)
        record = queue.submit(
            competition.id, sha256, size, producer, claim, tasks, submission_id=submission_id
        )
        if record.state == "refereeing":
            self.coord.work.notify()  # its referee jobs are claimable: wake long-poll claims
        log.info(
            "competition %s: submission %s by %s, claim %.4f: %s",
            competition.spec.name,
            record.id[:12],
            producer,
            claim,
            record.state,
        )
        return record

    # reports and decisions ----------------------------------------------------------------
    def tick(self) -> None:
        """Record every finished referee's report and decide every complete panel."""
        with self.lock:
            for submission in self.coord.queue.refereeing_submissions():
                try:
                    self._settle(submission)
                except Exception:
                    log.exception("submission %s: settling failed; retrying", submission.id[:12])

    def referee_done(self, job: JobRecord) -> None:
        """After a referee job's completion: settle its submission now (never raises: the
        completion stands, and the next tick retries)."""
        task = job.spec.task
        if not isinstance(task, RefereeTask):
            return
        try:
            with self.lock:
                submission = self.coord.queue.get_submission(task.submission_id)
                if submission.state == "refereeing":
                    self._settle(submission)
        except Exception:
            log.exception(
                "submission %s: settling failed; the next tick retries", task.submission_id
            )
            self.wake()

    def _settle(self, submission: SubmissionRecord) -> None:
        queue = self.coord.queue
        competition = queue.get_competition(submission.competition_id)
        spec: CompetitionSpec = competition.spec
        recorded = {r.index for r in submission.reports}
        reports: list[RefereeReport] = []
        for job in queue.panel_jobs(submission.id):
            if job.state not in TERMINAL:
                continue
            report = self.report(spec, job)  # a pure function of the stored job: recomputed
            if report.index not in recorded:
                queue.record_referee_report(job.id, job.epoch, report)
            reports.append(report)
        if len({r.index for r in reports}) < spec.referees:
            return  # referees still at work
        verdict = judge(
            submission.claim, submission.frontier_score, reports, m=spec.quorum, n=spec.referees
        )
        paid = payment(spec, submission.frontier_score, verdict)
        decided = queue.decide(submission.id, verdict, paid)
        log.info(
            "competition %s: submission %s %s, paid %.4f: %s",
            spec.name,
            submission.id[:12],
            decided.state,
            decided.paid,
            decided.verdict,
        )

    @staticmethod
    def report(spec: CompetitionSpec, job: JobRecord) -> RefereeReport:
        """The report of a finished referee job, computed from its loss arrays."""
        task = job.spec.task
        assert isinstance(task, RefereeTask)
        worker, host = job.worker_id or "", job.host or ""
        if job.state != "completed":
            why = (job.error or "no reason given").splitlines()[0][:300]
            return failed_report(task.index, worker, host, f"referee job {job.state}: {why}")
        candidate, frontier, missing = referee_losses(job.result)
        if missing:
            return failed_report(task.index, worker, host, missing)
        return report_from_losses(
            task.index,
            worker,
            host,
            candidate,
            frontier,
            margin=spec.margin,
            confidence=spec.confidence,
            resamples=spec.resamples,
            seed=task.seed,
            windows=task.windows,
        )


async def drive_forever(coord: Coordinator) -> None:
    """Tick the market driver every ``TICK_S`` (and when woken), on the leader only; run by
    the app's lifespan (``app.py``) beside the round driver."""
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    market = coord.market

    def wake_up() -> None:
        loop.call_soon_threadsafe(wake.set)

    market.wake = wake_up
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), TICK_S)
            wake.clear()
            if not coord.leader.is_leader:
                continue  # another coordinator of this database ticks (coordinator.leader)
            try:
                await asyncio.to_thread(market.tick)
            except Exception:
                log.exception("market driver tick failed; retrying")
    finally:
        market.wake = lambda: None
        # A cancelled await leaves its thread running: wait for that tick to end, or the
        # queue is closed under it on shutdown.
        await asyncio.to_thread(_wait_idle, market.lock)


def _wait_idle(lock: threading.Lock) -> None:
    with lock:
        pass


__all__ = [
    "MAX_MODEL_BYTES",
    "MarketDriver",
    "check_referee_losses",
    "drive_forever",
    "model_bytes_limit",
    "referee_jobs",
    "subset_seed",
]
