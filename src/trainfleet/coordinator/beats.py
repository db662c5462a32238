"""The heartbeat book: heartbeats absorbed in memory, flushed to the queue in batches.

A fleet of 10,000 workers beating every 2 s is 5,000 write transactions a second, enough to
starve the claims. So the coordinator answers a heartbeat from memory and writes only the
latest beat of each attempt, every ``beat_flush_s``, ``FLUSH_CHUNK`` beats to a transaction
(``queue.heartbeat_many``, fenced in its WHERE clause).

- **Fencing** is checked against the book's record of the attempt (job, worker, epoch). A
  claim fills the book (``expect``), so even an attempt's first beat is answered from memory;
  the flush then moves the job from ``claimed`` to ``running`` and writes the ``running``
  event at the beat's time (``queue.beats``), and a completion arriving before that flush
  folds the beat into its own UPDATE (``take_start``). Every other route writes the book's
  first beats before it runs (``write_starts``), so a read on this coordinator sees a job
  ``running`` as soon as its worker was told so. A beat the book does not
  know exactly (a stale epoch, an attempt the book forgot or claimed through another
  coordinator) is answered by the database, as before, and fills the book.
- **Cancels and requeues** reach the book within one flush: each flushed beat returns the
  job's state, so a cancelled job's worker is told to stop at its next beat, and an attempt
  written off is forgotten (its worker's next beat gets the database's 409). The operator's
  cancel, requeue and revoke routes drop the attempt from the book at once; a job a reload
  or a run's round ends is heard of when one of its beats is flushed.
- **Durability rule**: a coordinator crash loses at most one flush interval of beats. That is
  safe: on start the coordinator renews every active lease (``queue.renew_leases``), so no job
  is reaped for beats it lost, and fencing keeps a written-off worker's writes out. The
  reaper flushes the book before each pass, so no beat that arrived is ever missed by it.

**Interval and lease** (``Pace``): the coordinator tells each worker its heartbeat interval,
``max(base_interval_s, online_workers / beat_budget_per_s)``, so the fleet's beats stay within
the budget however large it grows, and the lease (the reaper's heartbeat timeout) follows,
``max(heartbeat_timeout_s, 3 * interval + 1)``. A longer lease applies at once; a shorter one
only after the longer one has held for a whole lease, so a worker still beating at the old
interval is never reaped. Every heartbeat reply carries both (``BeatReply``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from trainfleet.errors import ApiError
from trainfleet.queue.base import HeartbeatReply, JobQueue
from trainfleet.queue.beats import Beat, FlushResult

log = logging.getLogger(__name__)

Run = Callable[..., Awaitable[Any]]  # runs a blocking queue call off the event loop


DEFAULT_BUDGET_PER_S = 500.0  # heartbeats a second the fleet may send this coordinator
FLUSH_CHUNK = 128  # beats written in one transaction of a flush
# Whether a claim fills the book (``expect``), so an attempt's first beat is answered from
# memory too; its claimed -> running is written by the next flush, by the completion (folded
# into its UPDATE: ``sqlite_attempts.complete``) or the next claim's transaction, or before
# any other route runs (``write_starts``). Another coordinator on the same database sees
# ``running`` within one flush (``beat_flush_s``), as it sees every lease renewal.
FILL_ON_CLAIM = True


class BeatReply(HeartbeatReply):
    """The heartbeat reply, with the pace the worker should keep (fields added, so older
    workers keep reading ``cancel`` and ``state``)."""

    heartbeat_interval_s: float | None = Field(
        None, description="send the next heartbeat this many seconds after this one"
    )
    heartbeat_timeout_s: float | None = Field(
        None, description="the lease: an attempt silent this long is requeued"
    )


@dataclass(frozen=True)
class Pace:
    """How often workers beat, and how long a silent attempt keeps its lease."""

    base_interval_s: float = 2.0
    min_lease_s: float = 8.0
    budget_per_s: float = DEFAULT_BUDGET_PER_S

    def interval_s(self, online_workers: int) -> float:
        return max(self.base_interval_s, online_workers / self.budget_per_s)

    def lease_s(self, interval_s: float) -> float:
        return max(self.min_lease_s, 3 * interval_s + 1)


@dataclass
class _Attempt:
    worker_id: str
    epoch: int
    last_beat: float
    cancelled: bool = False
    started: bool = True  # a beat of it reached the database (the job is running there)


class HeartbeatBook:
    """Active attempts and their latest unflushed beats. Used from the event loop only."""

    def __init__(self, queue: JobQueue, pace: Pace, *, fill_on_claim: bool | None = None):
        self.queue = queue
        self.fill_on_claim = FILL_ON_CLAIM if fill_on_claim is None else fill_on_claim
        self.pace = pace
        self.interval_s = pace.interval_s(0)
        self.lease_s = pace.lease_s(self.interval_s)
        self._shorter_since: float | None = None  # when a shorter lease was first computed
        self._attempts: dict[str, _Attempt] = {}
        self._pending: dict[str, Beat] = {}
        self._starts: dict[str, set[str]] = {}  # worker -> jobs whose pending beat is a start
        self._flushing = asyncio.Lock()
        self._swept_at = float("-inf")  # when ``settle`` last dropped silent attempts
        self._base_offline_s = queue.settings.offline_after_s
        self._apply_lease()

    # answering --------------------------------------------------------------------------
    def answer(self, job_id: str, worker_id: str, epoch: int) -> BeatReply | None:
        """The reply from memory, or None when the database must answer (a miss)."""
        known = self._attempts.get(job_id)
        if known is None or known.worker_id != worker_id or known.epoch != epoch:
            return None
        if known.cancelled:
            return self._reply(cancel=True, state="cancelled")
        now = self.queue.clock()
        known.last_beat = now
        self._put(Beat(job_id, worker_id, epoch, now, start=not known.started))
        return self._reply(cancel=False, state="running")

    def expect(self, job_id: str, worker_id: str, epoch: int) -> None:
        """A claim just handed out (or handed again) attempt ``epoch``: its beats, the first
        one included, are answered from memory."""
        if not self.fill_on_claim:
            return
        known = self._attempts.get(job_id)
        if known is not None and (known.worker_id, known.epoch) == (worker_id, epoch):
            return  # a redelivered claim: the book already knows it
        self._drop(job_id)  # a beat of an older attempt: fenced anyway
        self._attempts[job_id] = _Attempt(worker_id, epoch, self.queue.clock(), started=False)

    def take_start(self, job_id: str, worker_id: str, epoch: int) -> Beat | None:
        """The attempt's first beat, if it is still unflushed: taken out of the book, for the
        caller (a completion) to write in its own transaction, or to give back
        (``give_back``) if that fails."""
        beat = self._pending.get(job_id)
        if beat is None or not beat.start or (beat.worker_id, beat.epoch) != (worker_id, epoch):
            return None
        self._drop(job_id)
        return beat

    def take_starts(self, worker_id: str) -> list[Beat]:
        """Every unflushed first beat of ``worker_id``'s attempts, taken out of the book: a
        claim writes them in its own transaction first, so it sees those jobs running (a
        claim asked again redelivers only the claims never beaten)."""
        jobs = self._starts.get(worker_id)
        if not jobs:
            return []
        beats = [self._pending[j] for j in sorted(jobs)]
        for job_id in list(jobs):
            self._drop(job_id)
        return beats

    def give_back(self, beat: Beat) -> None:
        """A beat ``take_start`` took that was not written after all: flushed as usual."""
        known = self._attempts.get(beat.job_id)
        mine = known is not None and (known.worker_id, known.epoch) == (beat.worker_id, beat.epoch)
        if mine and beat.job_id not in self._pending:
            self._put(beat)

    def remember(self, job_id: str, worker_id: str, epoch: int, reply: HeartbeatReply) -> BeatReply:
        """Record an attempt the database just answered for; returns the paced reply."""
        self._attempts[job_id] = _Attempt(
            worker_id, epoch, self.queue.clock(), cancelled=reply.cancel
        )
        return self._reply(cancel=reply.cancel, state=reply.state)

    def forget(self, job_id: str) -> None:
        """Drop an attempt (cancelled, requeued or reaped here): its next beat asks the
        database."""
        self._attempts.pop(job_id, None)
        self._drop(job_id)

    async def beat(self, job_id: str, worker_id: str, epoch: int, run: Run) -> BeatReply:
        reply = self.answer(job_id, worker_id, epoch)
        if reply is not None:
            return reply
        fresh: HeartbeatReply = await run(self.queue.heartbeat, job_id, worker_id, epoch)
        return self.remember(job_id, worker_id, epoch, fresh)

    async def beat_many(
        self, worker_id: str, items: list[tuple[str, int]], run: Run
    ) -> list[BeatReply | ApiError]:
        """``beat`` for each ``(job_id, epoch)`` of one worker, each reply or its error in
        order; the beats the book cannot answer go to the database in ONE call (one
        transaction) where the queue offers it (``heartbeat_each``)."""
        out: list[BeatReply | ApiError | None] = [self.answer(j, worker_id, e) for j, e in items]
        misses = [i for i, got in enumerate(out) if got is None]
        each = getattr(self.queue, "heartbeat_each", None)
        if misses and each is not None:
            fresh = await run(each, worker_id, [items[i] for i in misses])
            for i, got in zip(misses, fresh, strict=True):
                job_id, epoch = items[i]
                if not isinstance(got, ApiError):
                    got = self.remember(job_id, worker_id, epoch, got)
                out[i] = got
        elif misses:  # a queue without it: one database call per beat
            for i in misses:
                try:
                    out[i] = await self.beat(items[i][0], worker_id, items[i][1], run)
                except ApiError as err:
                    out[i] = err
        return [got for got in out if got is not None]

    def _put(self, beat: Beat) -> None:
        self._drop(beat.job_id)
        self._pending[beat.job_id] = beat
        if beat.start:
            self._starts.setdefault(beat.worker_id, set()).add(beat.job_id)

    def _drop(self, job_id: str) -> None:
        beat = self._pending.pop(job_id, None)
        if beat is not None and beat.start:
            jobs = self._starts.get(beat.worker_id)
            if jobs is not None:
                jobs.discard(job_id)
                if not jobs:
                    del self._starts[beat.worker_id]

    def _reply(self, *, cancel: bool, state: Any) -> BeatReply:
        return BeatReply(
            cancel=cancel,
            state=state,
            heartbeat_interval_s=self.interval_s,
            heartbeat_timeout_s=self.lease_s,
        )

    # flushing ---------------------------------------------------------------------------
    async def write_starts(self, run: Run) -> None:
        """Flush now if the book holds a first beat: every route but the worker's claim,
        beat and completion (which write or fold those beats in their own transaction)
        runs after this, so a read on this coordinator sees a job ``running`` once its
        worker was told so. Nothing to write, nothing done. A flush that fails is logged
        and kept for the next one; the route still runs (a read needs no write)."""
        if not self._starts:
            return
        try:
            await self.flush(run)
        except Exception:
            log.exception("writing the first beats before a read failed; retried at the next flush")

    async def flush(self, run: Run) -> int:
        """Write every pending beat, ``FLUSH_CHUNK`` to a transaction, one after the other;
        returns how many. Flushes never overlap, so a reaper pass that flushed first sees
        every beat received before it. Chunked so that a big fleet's flush (500 beats a
        second at 10,000 workers, two statements each) never holds the writer for long:
        a claim that arrives meanwhile waits for one chunk, not for the whole flush."""
        async with self._flushing:
            beats = list(self._pending.values())
            self._pending.clear()
            self._starts.clear()
            # At least one call, even with no beats: it also counts the online workers.
            for first in range(0, max(len(beats), 1), FLUSH_CHUNK):
                chunk = beats[first : first + FLUSH_CHUNK]
                try:
                    result: FlushResult = await run(self.queue.heartbeat_many, chunk)
                except BaseException:
                    for beat in beats[first:]:  # kept for the next flush, unless newer came
                        if beat.job_id not in self._pending:
                            self._put(beat)
                    raise
                self.settle(result)
            return len(beats)

    def settle(self, result: FlushResult) -> None:
        """Apply what the flush found: cancels, attempts gone, the fleet's size."""
        for outcome in result.outcomes:
            known = self._attempts.get(outcome.job_id)
            if known is None or known.epoch != outcome.epoch:
                continue  # the book already moved on (a newer attempt was answered since)
            if outcome.state == "cancelled":
                known.cancelled = True
            elif outcome.state == "running":
                known.started = True
            elif outcome.state != "claimed":
                self.forget(outcome.job_id)
        now = self.queue.clock()
        # Attempts that ended without a word (completed, failed) get no more beats. Swept
        # once a lease, not at every flush: a sweep reads every attempt, which is
        # milliseconds on the event loop with 10,000 workers (a claim's p99 otherwise).
        if now - self._swept_at >= self.lease_s:
            self._swept_at = now
            stale = [j for j, a in self._attempts.items() if now - a.last_beat > 2 * self.lease_s]
            for job_id in stale:
                self.forget(job_id)
        self.pace_for(result.online_workers, now)

    def pace_for(self, online_workers: int, now: float) -> None:
        """Set the interval and lease for ``online_workers``; a shorter lease waits."""
        interval = self.pace.interval_s(online_workers)
        lease = self.pace.lease_s(interval)
        if lease >= self.lease_s:
            self._shorter_since = None
        elif self._shorter_since is None:
            self._shorter_since = now
            return
        elif now - self._shorter_since < self.lease_s:
            return
        else:
            self._shorter_since = None
        if (interval, lease) != (self.interval_s, self.lease_s):
            log.info(
                "%d workers online: heartbeat every %.1fs, lease %.1fs",
                online_workers,
                interval,
                lease,
            )
        self.interval_s, self.lease_s = interval, lease
        self._apply_lease()

    def _apply_lease(self) -> None:
        """The reaper (``queue.reap``) and registration read the lease from the settings; a
        worker beating at a longer interval must not look offline between beats either."""
        settings = self.queue.settings
        update = {
            "heartbeat_timeout_s": self.lease_s,
            "offline_after_s": max(self._base_offline_s, 2 * self.lease_s),
        }
        if any(getattr(settings, k) != v for k, v in update.items()):
            self.queue.settings = settings.model_copy(update=update)


async def flush_forever(book: HeartbeatBook, flush_s: float, run: Run) -> None:
    """The flusher: every ``flush_s``, write the book's pending beats."""
    while True:
        await asyncio.sleep(flush_s)
        try:
            await book.flush(run)
        except Exception:
            log.exception("heartbeat flush failed; its beats are retried with the next ones")
