"""The control-plane seam of a pipeline: what producer and consumer programs talk to.

``PipelineControl`` is the small interface (torchft's ``Manager`` is the model) a producer or
consumer attempt uses: producers ``publish`` refs and ``sync`` (learn what to release and what
to (re)produce); consumers ``lease`` refs, ``ack`` each one *before* training on it, and
``return_samples`` they cannot fetch. Only ``SampleRef``s cross it, never tensor bytes. In a
fleet it is ``pipeline.client.HttpControl`` over the coordinator's durable ref queue
(``queue/sqlite_pipelines.py``); here is ``LocalControl``, the same rules in memory, for
colocated mode (teacher and student in one process) and for library tests.

The rules (the design's durable queue, one lock for what is one transaction there):

- a sample is ``ready`` once published, ``leased`` by one consumer attempt until
  ``leased_until``, ``consumed`` once that attempt acked it, ``committed`` when the
  consumer job completed with that attempt, ``requeued`` when it must be produced again;
- consumer ``k`` of ``num`` leases the ready samples whose stable ``bucket(sample_id) % num ==
  k``, in index order; when its partition is empty it also takes ready samples of partitions
  whose consumer job is not running (pending for want of a worker, finished, cancelled:
  nothing is stranded); ``k >= num``
  retires; ``done`` = every sample published and none ready, leased or requeued;
- ack: leased by this attempt -> consumed; already consumed/committed by this attempt ->
  accepted again (idempotent, the first step kept); anything else -> refused with a reason;
- ``settle``: an expired lease, or one held by an attempt that ended, goes back to ready (or
  to requeued when the producer attempt that published it ended and the store died with it);
  a sample consumed by an attempt that ended without completing is requeued (that attempt's
  model is discarded, so every sample still trains exactly one kept model);
- ``sync`` (producer ``p``, share ``idx % producers == p``): marks the ids it reports
  released, then answers the refs to release (consumed or committed, not yet released), the
  indices to produce (never published, or requeued) and whether it is finished (every sample
  of its share committed and released).

A LocalControl hands out one handle per attempt (``producer(p)``, ``consumer(k)``); an attempt
ends with ``end(handle, completed=...)``, as a job process exits. Calls from a handle whose
attempt is no longer current raise ``StaleEpoch`` like the HTTP API's 409.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from trainfleet.errors import BadRef, BadRequest, StaleEpoch
from trainfleet.features.ref import SampleRef, verify_ref
from trainfleet.manifest.pipelines import bucket, sample_id

SampleState = Literal["ready", "leased", "consumed", "committed", "requeued"]
JobStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
Role = Literal["producer", "consumer"]


@dataclass(frozen=True)
class Lease:
    """A consumer's lease reply: refs to train on (idx order), whether this consumer is
    retired (its index >= the current consumer count) and whether every sample is consumed."""

    samples: list[SampleRef]
    retire: bool
    done: bool
    num_consumers: int


@dataclass(frozen=True)
class PublishResult:
    accepted: list[str]  # sample ids now ready
    skipped: list[tuple[str, str]]  # (sample id, reason): already ready/leased/consumed


@dataclass(frozen=True)
class AckResult:
    sample_id: str
    accepted: bool  # False: the consumer must NOT train on it
    reason: str = ""


@dataclass(frozen=True)
class Sync:
    """A producer's sync reply."""

    release: list[SampleRef]  # consumed refs to free in the producer's store
    produce: list[int]  # sample indices of its share to (re)produce
    finished: bool  # its share is committed and released: exit


class PipelineControl(Protocol):
    """One attempt's view of a pipeline's control plane (module doc)."""

    def publish(self, refs: list[SampleRef]) -> PublishResult: ...
    def lease(self, max_samples: int) -> Lease: ...
    def ack(self, acks: list[tuple[str, int]]) -> list[AckResult]: ...
    def return_samples(self, sample_ids: list[str]) -> int: ...
    def sync(self, released: list[str]) -> Sync: ...


@dataclass
class _Row:
    idx: int
    bucket: int
    ref: SampleRef
    producer: tuple[int, int]  # (producer index, epoch) that published it
    state: SampleState = "ready"
    released: bool = False
    consumer: tuple[int, int] | None = None  # (consumer index, epoch)
    step: int | None = None
    leased_until: float = 0.0
    times_produced: int = 1


@dataclass
class _Job:
    status: JobStatus = "pending"
    epoch: int = 0


@dataclass
class LocalAttempt:
    """The handle of one attempt of a producer or consumer job: a ``PipelineControl``."""

    control: LocalControl
    role: Role
    index: int
    epoch: int
    acked: list[tuple[str, int]] = field(default_factory=list)  # accepted acks, in order

    def publish(self, refs: list[SampleRef]) -> PublishResult:
        return self.control._publish(self, refs)

    def lease(self, max_samples: int) -> Lease:
        return self.control._lease(self, max_samples)

    def ack(self, acks: list[tuple[str, int]]) -> list[AckResult]:
        return self.control._ack(self, acks)

    def return_samples(self, sample_ids: list[str]) -> int:
        return self.control._return(self, sample_ids)

    def sync(self, released: list[str]) -> Sync:
        return self.control._sync(self, released)


class LocalControl:
    """The durable ref queue's rules, in memory and thread-safe (module doc).

    ``store`` says whether published bytes outlive their producer attempt: ``"dir:..."``
    does; ``"mem"`` and ``"http"`` die with it (a ready sample of an ended producer attempt is
    requeued)."""

    def __init__(
        self,
        samples: int,
        producers: int,
        consumers: int,
        secret: bytes,
        *,
        lease_s: float = 60.0,
        store: str = "mem",
        clock: Callable[[], float] = time.monotonic,
    ):
        if not (samples >= 1 and 1 <= producers <= samples and consumers >= 1):
            raise ValueError(f"bad pipeline shape: {samples=} {producers=} {consumers=}")
        self.samples = samples
        self.producers = producers
        self.consumers = consumers
        self.secret = secret
        self.lease_s = lease_s
        self.store_outlives_producer = store.startswith("dir:")
        self.clock = clock
        self._rows: dict[str, _Row] = {}
        self._jobs: dict[tuple[Role, int], _Job] = {}
        self._changed = threading.Condition(threading.RLock())
        for p in range(producers):
            self._jobs[("producer", p)] = _Job()
        for k in range(consumers):
            self._jobs[("consumer", k)] = _Job()

    # attempts -------------------------------------------------------------------------
    def producer(self, index: int) -> LocalAttempt:
        """Start a new attempt of producer ``index`` (a running one is written off)."""
        if not 0 <= index < self.producers:
            raise ValueError(f"producer {index} of {self.producers}")
        return self._start("producer", index)

    def consumer(self, index: int) -> LocalAttempt:
        """Start a new attempt of consumer ``index`` (a running one is written off)."""
        return self._start("consumer", index)

    def _start(self, role: Role, index: int) -> LocalAttempt:
        with self._changed:
            job = self._jobs.setdefault((role, index), _Job())
            job.epoch += 1
            job.status = "running"
            self._settle_locked()
            self._changed.notify_all()
            return LocalAttempt(self, role, index, job.epoch)

    def end(self, attempt: LocalAttempt, *, completed: bool) -> None:
        """The attempt's process exited: successfully (its consumed samples commit) or not
        (the job goes back to pending; its leases and consumed samples return)."""
        with self._changed:
            job = self._jobs[(attempt.role, attempt.index)]
            if job.epoch == attempt.epoch and job.status == "running":
                job.status = "completed" if completed else "pending"
            self._settle_locked()
            self._changed.notify_all()

    def set_consumers(self, num: int) -> None:
        """Change the consumer count (a manifest reload): partitions change at once; pending
        consumer jobs ``>= num`` are cancelled, running ones retire at their next lease."""
        if num < 1:
            raise ValueError("consumers >= 1")
        with self._changed:
            self.consumers = num
            for (role, index), job in self._jobs.items():
                if role == "consumer" and index >= num and job.status == "pending":
                    job.status = "cancelled"
            for k in range(num):
                self._jobs.setdefault(("consumer", k), _Job())
            self._changed.notify_all()

    def _current(self, attempt: LocalAttempt, role: Role) -> None:
        job = self._jobs.get((attempt.role, attempt.index))
        if attempt.role != role:
            raise BadRequest(f"a {attempt.role} cannot do what a {role} does")
        if job is None or job.epoch != attempt.epoch or job.status != "running":
            raise StaleEpoch(
                f"{attempt.role} {attempt.index} attempt {attempt.epoch} is not the running one"
            )

    def _running(self, role: Role, who: tuple[int, int] | None) -> bool:
        if who is None:
            return False
        job = self._jobs.get((role, who[0]))
        return job is not None and job.epoch == who[1] and job.status == "running"

    # the rules ------------------------------------------------------------------------
    def _publish(self, attempt: LocalAttempt, refs: list[SampleRef]) -> PublishResult:
        with self._changed:
            self._current(attempt, "producer")
            for ref in refs:  # all checked before any is taken, as one transaction
                try:
                    verify_ref(ref, self.secret)
                    idx = int(ref.sample_id)
                except (BadRef, ValueError) as e:
                    raise BadRequest(f"sample {ref.sample_id}: {e}") from e
                if sample_id(idx) != ref.sample_id or not (
                    0 <= idx < self.samples and idx % self.producers == attempt.index
                ):
                    raise BadRequest(
                        f"sample {ref.sample_id} is not in producer {attempt.index}'s share"
                    )
            accepted: list[str] = []
            skipped: list[tuple[str, str]] = []
            who = (attempt.index, attempt.epoch)
            for ref in refs:
                row = self._rows.get(ref.sample_id)
                if row is None:
                    idx = int(ref.sample_id)
                    self._rows[ref.sample_id] = _Row(idx, bucket(ref.sample_id), ref, who)
                elif row.state == "requeued":
                    row.ref, row.producer, row.state = ref, who, "ready"
                    row.released, row.consumer, row.step = False, None, None
                    row.times_produced += 1
                else:
                    skipped.append((ref.sample_id, f"already {row.state}"))
                    continue
                accepted.append(ref.sample_id)
            self._changed.notify_all()
            return PublishResult(accepted=accepted, skipped=skipped)

    def _lease(self, attempt: LocalAttempt, max_samples: int) -> Lease:
        with self._changed:
            self._current(attempt, "consumer")
            self._settle_locked()
            num = self.consumers
            if attempt.index >= num:
                return Lease([], retire=True, done=self._done_locked(), num_consumers=num)
            ready = sorted(
                (r for r in self._rows.values() if r.state == "ready"), key=lambda r: r.idx
            )
            mine = [r for r in ready if r.bucket % num == attempt.index]
            if not mine:
                mine = [r for r in ready if self._orphaned(r.bucket % num)]
            taken = mine[:max_samples]
            until = self.clock() + self.lease_s
            for row in taken:
                row.state, row.consumer, row.leased_until = (
                    "leased",
                    (attempt.index, attempt.epoch),
                    until,
                )
            if taken:
                self._changed.notify_all()
            return Lease(
                [r.ref for r in taken], retire=False, done=self._done_locked(), num_consumers=num
            )

    def _orphaned(self, partition: int) -> bool:
        job = self._jobs.get(("consumer", partition))
        return job is None or job.status != "running"

    def _ack(self, attempt: LocalAttempt, acks: list[tuple[str, int]]) -> list[AckResult]:
        with self._changed:
            self._current(attempt, "consumer")
            who = (attempt.index, attempt.epoch)
            results = []
            for sid, step in acks:
                row = self._rows.get(sid)
                if row is None:
                    results.append(AckResult(sid, False, "unknown sample"))
                elif row.state == "leased" and row.consumer == who:
                    row.state, row.step = "consumed", step
                    attempt.acked.append((sid, step))
                    results.append(AckResult(sid, True))
                elif row.state in ("consumed", "committed") and row.consumer == who:
                    results.append(AckResult(sid, True, "already acked"))
                else:
                    owner = "this attempt" if row.consumer == who else "another attempt"
                    results.append(AckResult(sid, False, f"{row.state} by {owner}"))
            self._changed.notify_all()
            return results

    def _return(self, attempt: LocalAttempt, sample_ids: list[str]) -> int:
        with self._changed:
            self._current(attempt, "consumer")
            who = (attempt.index, attempt.epoch)
            returned = 0
            for sid in sample_ids:
                row = self._rows.get(sid)
                if row is not None and row.state == "leased" and row.consumer == who:
                    row.state, row.consumer = "requeued", None
                    returned += 1
            self._changed.notify_all()
            return returned

    def _sync(self, attempt: LocalAttempt, released: list[str]) -> Sync:
        with self._changed:
            self._current(attempt, "producer")
            self._settle_locked()
            for sid in released:
                row = self._rows.get(sid)
                if row is not None and row.state in ("consumed", "committed", "requeued"):
                    row.released = True
            share = range(attempt.index, self.samples, self.producers)
            release, produce = [], []
            finished = True
            for idx in share:
                row = self._rows.get(sample_id(idx))
                if row is None or row.state == "requeued":
                    produce.append(idx)
                elif row.state in ("consumed", "committed") and not row.released:
                    release.append(row.ref)
                if row is None or row.state != "committed" or not row.released:
                    finished = False
            self._changed.notify_all()
            return Sync(release=release, produce=produce, finished=finished)

    def settle(self) -> None:
        """Apply the time- and attempt-driven transitions now (the module doc's ``settle``)."""
        with self._changed:
            self._settle_locked()
            self._changed.notify_all()

    def _settle_locked(self) -> None:
        now = self.clock()
        for row in self._rows.values():
            producer_alive = self.store_outlives_producer or self._running("producer", row.producer)
            if row.state == "leased" and (
                row.leased_until <= now or not self._running("consumer", row.consumer)
            ):
                row.state = "ready" if producer_alive else "requeued"
                row.consumer = None
            elif row.state == "consumed" and not self._running("consumer", row.consumer):
                assert row.consumer is not None
                job = self._jobs[("consumer", row.consumer[0])]
                if job.status == "completed" and job.epoch == row.consumer[1]:
                    row.state = "committed"
                else:
                    row.state, row.consumer, row.step = "requeued", None, None
            elif row.state == "ready" and not producer_alive:
                row.state = "requeued"

    # reading --------------------------------------------------------------------------
    def _done_locked(self) -> bool:
        return len(self._rows) == self.samples and all(
            r.state in ("consumed", "committed") for r in self._rows.values()
        )

    def done(self) -> bool:
        with self._changed:
            return self._done_locked()

    def states(self) -> dict[str, SampleState]:
        """Each published sample's state, by id."""
        with self._changed:
            return {sid: r.state for sid, r in sorted(self._rows.items())}

    def counts(self) -> dict[str, int]:
        """What ``trainfleet pipeline show`` reports, for this queue."""
        with self._changed:
            rows = list(self._rows.values())
            by_state = {s: sum(r.state == s for r in rows) for s in _STATES}
            return {
                "produced": len(rows),
                "backlog": by_state["ready"] + by_state["requeued"] + self.samples - len(rows),
                "in_flight": by_state["leased"],
                "consumed": by_state["consumed"] + by_state["committed"],
                "committed": by_state["committed"],
                "released": sum(r.released for r in rows),
                "reproduced": sum(r.times_produced for r in rows) - len(rows),
            }

    def wait_for(self, predicate: Callable[[LocalControl], bool], timeout_s: float) -> bool:
        """Block until ``predicate(self)`` holds (re-checked at every change, and as leases
        expire); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.05))
            return True


_STATES: tuple[SampleState, ...] = ("ready", "leased", "consumed", "committed", "requeued")
