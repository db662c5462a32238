"""The round driver: opens, judges and closes the rounds of collaborative DiLoCo runs.

DiLoCo (Douillard et al. 2023, arXiv 2311.08105): each round, every replica starts from the
same global weights, takes H inner steps and returns its pseudo-gradient; the coordinator
averages them and takes one outer Nesterov step. Here a round's replicas are queue jobs
(``kind = "replica"``), so claims, fencing and reaping are the queue's; this module decides
what a contribution is worth and when a round ends. Tables: ``queue.sqlite_runs``; the pure
rules (when to close, the tasks of a round): ``round_plan``.

Rules:

- **Opening.** A run new in a reload gets round 0 at the next tick: weights =
  ``inner.init_weights(GPTParams(**hyper))`` stored (safetensors) in the artifact store by
  sha256, and one task per replica. Every replica of round r is handed the same digest, so
  all start from byte-identical weights, whichever worker (re)claims a task.
- **Arrival** (``complete``, on the worker's completion). The pseudo-gradient is decoded
  against the round's start weights: malformed or non-finite -> ``refused`` with the reason
  at once (the attempt still completes; ``result.verdict`` says so); otherwise ``accepted``
  with its norm, inner steps and compute time. More than ``max_staleness`` rounds late, or
  after the run ended, it is ``dropped``.
- **Closing** round r, when (a) every replica reported (accepted or refused) or its task
  failed for good; or (b) accepted >= quorum and ``straggler_wait x (quorum_at - opened_at)``
  has passed since ``quorum_at``; or (c) ``round_timeout_s`` has passed with accepted >=
  quorum. Below quorum at the timeout the round stays open (its ``detail`` says so; lost tasks
  are requeued by the queue's own rules); it never fails the run.
- **The close**: all unapplied accepted contributions, this round's and late ones of earlier
  rounds, in (round, replica) order; older than ``max_staleness`` -> dropped; the rest are
  screened (``outer.screen``: non-finite, norm > outlier_factor x median -> refused), averaged
  (``outer.average``: weight = inner_steps_done / H, damped 1/(1+staleness)) and applied by
  ``outer.outer_step`` (warm-up rounds: lr 1, momentum 0 and the momentum buffer untouched).
  No usable contribution: the weights stay as they were (the outer step is discarded, like
  torchft's ``should_commit``). Held-out loss every ``eval_every`` rounds and at the last.
  Then ONE queue transaction records the close and opens round r+1 (or completes the run).
  Running tasks of round r keep running; their contributions apply late, at the next close.
- **Determinism**: a close depends only on stored rows and content-addressed blobs, so a
  coordinator that dies before the close's transaction computes the same close on restart:
  no accepted contribution is lost and no round is applied twice.
- **Adaptive H**: round r+1's ``target_s`` = median over round r's applied contributions of
  ``compute_s x H / inner_steps_done`` (none after a warm-up round).

Ticks run after each replica completion and every ``TICK_S`` (``app.py``), in a thread, under
one lock.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import statistics
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from trainfleet.coordinator.round_plan import (
    close_reason,
    inner_steps_of,
    replica_tasks,
    target_s,
)
from trainfleet.errors import NotFound
from trainfleet.manifest.runs import CompressionSpec, RunSpec
from trainfleet.queue.base import ACTIVE_STATES, JobRecord
from trainfleet.queue.runs_base import (
    ContributionRecord,
    RoundOutcome,
    RoundStatus,
    RunRecord,
    Verdict,
)
from trainfleet.train.recipes import GPTParams

if TYPE_CHECKING:
    from torch import Tensor

    from trainfleet.coordinator.state import Coordinator

log = logging.getLogger(__name__)

TICK_S = 0.5
CACHED_WEIGHTS = 4  # decoded start weights kept in memory (the open round and a few before)
Weights = dict[str, "Tensor"]
Evaluate = Callable[[RunSpec, Weights], float]


class RoundDriver:
    """Drives every run's rounds for one coordinator. ``evaluate`` (held-out loss of new
    weights) is injectable; by default ``inner.heldout_loss`` with a cache under ``runs_dir``."""

    def __init__(self, coord: Coordinator, evaluate: Evaluate | None = None):
        self.coord = coord
        self.evaluate: Evaluate = evaluate or self._heldout_loss
        self.lock = threading.Lock()
        self._weights: OrderedDict[str, Weights] = OrderedDict()
        self._weights_lock = threading.Lock()
        self._noted: set[tuple[str, int]] = set()
        self.wake: Callable[[], None] = lambda: None  # set by the app's ticker

    # blobs --------------------------------------------------------------------------------
    def load_weights(self, sha256: str) -> Weights:
        """Tensors of a stored safetensors blob (cached: the same few start weights are
        read by every arrival and close of a round)."""
        import safetensors.torch

        with self._weights_lock:
            if sha256 in self._weights:
                self._weights.move_to_end(sha256)
                return self._weights[sha256]
        tensors = safetensors.torch.load(self.coord.store.read_bytes(sha256))
        with self._weights_lock:
            self._weights[sha256] = tensors
            while len(self._weights) > CACHED_WEIGHTS:
                self._weights.popitem(last=False)
        return tensors

    def save_weights(self, tensors: Weights) -> tuple[str, int]:
        """Store fp32 tensors as safetensors, content addressed; (sha256, size)."""
        import safetensors.torch

        data = safetensors.torch.save({k: tensors[k].contiguous() for k in sorted(tensors)})
        sha = hashlib.sha256(data).hexdigest()
        staging = self.coord.staging_dir
        fd, name = tempfile.mkstemp(prefix="weights-", suffix=".part", dir=staging)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.coord.store.commit_file(name, sha, len(data))
        finally:
            os.unlink(name)
        return sha, len(data)

    # arrival ------------------------------------------------------------------------------
    def complete(
        self, job: JobRecord, worker_id: str, epoch: int, result: dict[str, Any]
    ) -> JobRecord:
        """Judge a replica's completion and record it (``complete_replica``)."""
        current = job.state in ACTIVE_STATES and (job.epoch, job.worker_id) == (epoch, worker_id)
        # Not current: the queue answers a repeated report from the stored job, or refuses.
        verdict = self.judge(job, result) if current else Verdict("refused", "not current")
        record = self.coord.queue.complete_replica(job.id, worker_id, epoch, result, verdict)
        if current:
            self.coord.metrics.contributions.labels(verdict.status).inc()
        self.wake()
        return record

    def judge(self, job: JobRecord, result: dict[str, Any]) -> Verdict:
        from trainfleet.train import pseudograd

        task = job.spec.replica_task
        assert task is not None
        # What the replica did: its contribution record, else its metrics (as the worker
        # reported them; they only weigh its pseudo-gradient, within [0, H] steps).
        said = {**_mapping(result.get("metrics")), **_mapping(result.get("contribution"))}
        steps = _number(said.get("inner_steps_done"))
        done = task.inner_steps if steps is None else max(0, min(task.inner_steps, int(steps)))
        compute_s = _number(said.get("compute_s"))
        if compute_s is not None and not 0 <= compute_s <= (job.spec.timeout_s or 0):
            compute_s = None  # no attempt computes for longer than its timeout
        sha = result.get("artifact")
        if not isinstance(sha, str):
            return Verdict("refused", "the result names no pseudo-gradient artifact")
        reference = self.load_weights(task.weights)
        limit = pseudograd.default_max_bytes(reference)
        try:
            size = self.coord.store.size(sha)
            if size > limit:  # sized before it is read: no worker makes us load 16 GiB
                reason = f"malformed pseudo-gradient: file of {size} bytes exceeds {limit}"
                return Verdict("refused", reason, None, sha, size, done, compute_s)
            data = self.coord.store.read_bytes(sha)
        except NotFound:
            return Verdict("refused", f"artifact {sha[:12]} is not stored", sha256=sha)

        def verdict(status: Literal["accepted", "refused"], reason: str = "") -> Verdict:
            norm = pseudograd.global_norm(delta) if status == "accepted" else None
            return Verdict(status, reason, norm, sha, len(data), done, compute_s)

        try:
            decoded = pseudograd.decode(data, reference, limit)
        except Exception as err:  # PseudoGradError, or anything else a crafted file trips
            return verdict("refused", f"malformed pseudo-gradient: {str(err)[:500]}")
        delta = decoded.delta
        denser = _denser_than_asked(decoded, task.compression, reference)
        if denser:
            return verdict("refused", denser)
        if not pseudograd.all_finite(delta):
            return verdict("refused", "non-finite values in the pseudo-gradient")
        return verdict("accepted")

    # ticks --------------------------------------------------------------------------------
    def tick(self) -> None:
        """Open new runs' first rounds and close every round whose time has come."""
        queue = self.coord.queue
        with self.lock:
            for run in queue.runs_to_open():
                try:
                    self._open_first(run)
                except Exception:
                    log.exception("run %s: opening round 0 failed; retrying", run.name)
            for status in queue.open_rounds():
                try:
                    self._maybe_close(status)
                except Exception:
                    log.exception(
                        "run %s: closing round %d failed; retrying",
                        status.run.name,
                        status.round.round,
                    )

    def _open_first(self, run: RunRecord) -> None:
        from trainfleet.train import inner

        sha, size = self.save_weights(inner.init_weights(GPTParams(**run.spec.hyper)))
        if self.coord.queue.open_first_round(
            run.id, sha, size, replica_tasks(run, 0, sha, size, None)
        ):
            self.coord.work.notify()  # its tasks are claimable: wake long-poll claims
            log.info("run %s (%s): round 0 opened, weights %s", run.name, run.id[:12], sha[:12])

    def _maybe_close(self, st: RoundStatus) -> None:
        spec, rnd = st.run.spec, st.round
        now = self.coord.queue.clock()
        mine = [c for c in st.contributions if c.round == rnd.round]
        accepted = [c for c in mine if c.status == "accepted"]
        reported = {c.replica for c in mine if c.status in ("accepted", "refused")}
        gone = {k for k, s in st.task_states.items() if s in ("failed", "cancelled")}
        all_in = all(k in reported or k in gone for k in range(spec.replicas))
        why = close_reason(spec, rnd, len(accepted), all_in, now)
        if why is None:
            if (
                now >= rnd.opened_at + spec.round_timeout_s
                and (st.run.id, rnd.round) not in self._noted
            ):
                self._noted.add((st.run.id, rnd.round))
                detail = (
                    f"timed out after {spec.round_timeout_s:g}s with {len(accepted)} of"
                    f" {spec.quorum} contributions needed; open until quorum"
                )
                log.warning("run %s round %d: %s", st.run.name, rnd.round, detail)
                self.coord.queue.note_round(st.run.id, rnd.round, detail)
            return
        outcome = self.close(st, why)
        if self.coord.queue.close_round(outcome):
            self.coord.work.notify()  # the next round's tasks are claimable
            self.coord.metrics.rounds_closed.inc()
            log.info(
                "run %s round %d closed (%s): %d applied, %d late, %d refused, %d dropped, loss %s",
                st.run.name,
                rnd.round,
                why,
                outcome.accepted,
                outcome.late_applied,
                len(outcome.refused),
                len(outcome.dropped),
                outcome.heldout_loss,
            )

    # the close ----------------------------------------------------------------------------
    def close(self, st: RoundStatus, why: str) -> RoundOutcome:
        """Compute a close (no writes but content-addressed blobs): see the module doc."""
        from trainfleet.train import outer, pseudograd

        run, spec, rnd = st.run, st.run.spec, st.round
        starts = {r.round: r.weights for r in self.coord.queue.run_rounds(run.id)}
        pending = sorted(
            (c for c in st.contributions if c.status == "accepted"),
            key=lambda c: (c.round, c.replica, c.created_at),
        )
        dropped: list[tuple[str, int, str]] = []
        refused: list[tuple[str, int, str]] = []
        used: list[tuple[ContributionRecord, Any]] = []
        for c in pending:
            staleness = rnd.round - c.round
            if staleness > spec.max_staleness:
                dropped.append((c.job_id, c.epoch, f"too stale at close: {staleness} rounds"))
                continue
            try:
                assert c.sha256 is not None
                delta = pseudograd.decode(
                    self.coord.store.read_bytes(c.sha256), self.load_weights(starts[c.round])
                ).delta
            except Exception as err:  # recorded as refused; one bad file never stops a run
                refused.append((c.job_id, c.epoch, f"unreadable at close: {err}"))
                continue
            h = inner_steps_of(spec, c.round)
            weight = max(1, c.inner_steps_done) / h
            contrib = outer.Contribution(c.replica, delta, staleness, weight, c.worker_id)
            used.append((c, contrib))
        kept, screened = outer.screen(
            [x for _, x in used], spec.outlier_factor, self._history_median(run.id, spec, rnd.round)
        )
        by_obj = {id(x): c for c, x in used}
        refused += [(by_obj[id(x)].job_id, by_obj[id(x)].epoch, why_) for x, why_ in screened]
        applied = [by_obj[id(x)] for x in kept]
        weights = self.load_weights(rnd.weights)
        momentum_sha = run.momentum
        detail = why
        if kept:
            warm = rnd.round < spec.warmup_rounds
            lr, mu = (1.0, 0.0) if warm else (spec.outer_lr, spec.outer_momentum)
            old_m = self.load_weights(run.momentum) if run.momentum and not warm else None
            new_w, new_m = outer.outer_step(weights, outer.average(kept), old_m, lr, mu)
            if not (pseudograd.all_finite(new_w) and pseudograd.all_finite(new_m or {})):
                # finite pseudo-gradients whose step overflows fp32: refused, step discarded
                reason = "the outer step with it overflows fp32"
                refused += [(c.job_id, c.epoch, reason) for c in applied]
                applied = []
                new_w = weights
                detail += "; outer step not finite: discarded, weights unchanged"
            elif not warm:
                momentum_sha = None if new_m is None else self.save_weights(new_m)[0]
        else:
            new_w = weights
            detail += "; no usable contribution: weights unchanged"
        sha, size = self.save_weights(new_w)
        nxt = rnd.round + 1
        loss = None
        if nxt % spec.eval_every == 0 or nxt >= run.num_rounds:
            try:
                loss = self.evaluate(spec, new_w)
                if not math.isfinite(loss):  # stored, it would break every JSON read
                    detail += f"; held-out loss {loss}"
                    loss = None
            except Exception as err:
                log.exception("run %s round %d: held-out evaluation failed", run.name, rnd.round)
                detail += f"; evaluation failed: {err}"
        target = target_s(spec, rnd.round, applied) if spec.adaptive_inner_steps else None
        on_time = sum(c.round == rnd.round for c in applied)
        return RoundOutcome(
            run_id=run.id,
            round=rnd.round,
            applied=[(c.job_id, c.epoch) for c in applied],
            refused=refused,
            dropped=dropped,
            accepted=on_time,
            late_applied=len(applied) - on_time,
            heldout_loss=loss,
            next_weights=sha,
            next_weights_size=size,
            momentum=momentum_sha,
            detail=detail,
            next_tasks=replica_tasks(run, nxt, sha, size, target) if nxt < run.num_rounds else [],
            next_target_s=target,
        )

    def _history_median(self, run_id: str, spec: RunSpec, round: int) -> float | None:
        """The median norm of the contributions applied in the last earlier round with the
        same H (a warm-up round's single step is not comparable), or None."""
        h = inner_steps_of(spec, round)
        by_round: dict[int, list[float]] = {}
        for c in self.coord.queue.run_contributions(run_id):
            comparable = c.round < round and inner_steps_of(spec, c.round) == h
            if c.status == "applied" and c.norm and comparable:
                by_round.setdefault(c.round, []).append(c.norm)
        if not by_round:
            return None
        return statistics.median(by_round[max(by_round)])

    def _heldout_loss(self, spec: RunSpec, weights: Weights) -> float:
        from trainfleet.data.prepare import CacheSettings
        from trainfleet.train import inner

        assert self.coord.runs_dir is not None
        settings = CacheSettings(directory=self.coord.runs_dir / "eval-cache")
        return inner.heldout_loss(GPTParams(**spec.hyper), spec.dataset, weights, settings)


def _denser_than_asked(decoded: Any, asked: CompressionSpec, reference: Weights) -> str:
    """Why a pseudo-gradient's codec sends more bytes than the run's own (a worker may pick a
    sparser one for its link, never a denser one), or ''."""
    from trainfleet.train import pseudograd

    try:
        sent = CompressionSpec(
            kind=decoded.codec,
            density=float(decoded.meta.get("density", asked.density)),
            bits=int(decoded.meta.get("bits", asked.bits)),
        )
    except (ValueError, TypeError) as err:
        return f"malformed pseudo-gradient: codec parameters: {str(err)[:200]}"
    num_params = sum(t.numel() for t in reference.values())
    sent_bytes = pseudograd.num_bytes_for(sent, num_params)
    asked_bytes = pseudograd.num_bytes_for(asked, num_params)
    if sent_bytes <= asked_bytes:
        return ""
    return (
        f"codec {sent.kind} ({sent_bytes} bytes) is denser than the run's"
        f" {asked.kind} ({asked_bytes} bytes): a replica may send less, never more"
    )


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None
