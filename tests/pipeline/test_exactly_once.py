"""Every sample trains exactly one kept student while the consumer count goes 1 -> 2 -> 3
mid-run and one consumer attempt dies right after acking (before it could train).

Threads stand in for job processes (one producer, consumer attempts) over a ``LocalControl``
and an ``InProcessStore``; the test plays the worker: it ends attempts as their "process"
exits, changes the consumer count, and starts a new attempt of the consumer that died. Each
consumer is paced (it may not lease past an allowance the test raises), so the phases overlap
deterministically in what they prove, whatever the thread timing.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from kdkit import TINY_TEACHER, tiny_spec

from trainfleet.features import InProcessStore
from trainfleet.features.ref import SampleRef
from trainfleet.manifest.pipelines import sample_id
from trainfleet.pipeline.consumer import ConsumerResult, consume
from trainfleet.pipeline.control import AckResult, Lease, LocalAttempt, LocalControl
from trainfleet.pipeline.distill import load_teacher
from trainfleet.pipeline.producer import ProducerResult, produce

SAMPLES = 36
WAIT_S = 120.0
QUIET: dict[str, Any] = {"num_threads": 1, "poll_s": 0.01, "log": lambda _: None}


class Died(Exception):
    """The consumer's process died (here: right after an accepted ack, before training)."""


class Paced:
    """A consumer attempt's control that leases only while its accepted acks are under an
    allowance, and can die after its ``die_after``-th accepted ack."""

    def __init__(self, attempt: LocalAttempt, allowance: int | None, die_after: int | None = None):
        self.attempt = attempt
        self.allowance = allowance
        self.die_after = die_after
        self.changed = threading.Condition()

    def allow(self, allowance: int | None) -> None:
        with self.changed:
            self.allowance = allowance
            self.changed.notify_all()

    def lease(self, max_samples: int) -> Lease:
        with self.changed:
            self.changed.wait_for(
                lambda: self.allowance is None or len(self.attempt.acked) < self.allowance,
                timeout=WAIT_S,
            )
        return self.attempt.lease(max_samples)

    def ack(self, acks: list[tuple[str, int]]) -> list[AckResult]:
        results = self.attempt.ack(acks)
        if self.die_after is not None and len(self.attempt.acked) >= self.die_after:
            raise Died(f"died after acking {self.attempt.acked}")
        return results

    def publish(self, refs: list[SampleRef]) -> Any:
        return self.attempt.publish(refs)

    def return_samples(self, sample_ids: list[str]) -> int:
        return self.attempt.return_samples(sample_ids)

    def sync(self, released: list[str]) -> Any:
        return self.attempt.sync(released)


class Run:
    """A thread running ``fn`` that keeps its result or the exception it raised."""

    def __init__(self, fn: Any):
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self.result = fn()
        except BaseException as e:
            self.error = e

    def join(self) -> None:
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive()


def test_every_sample_is_consumed_exactly_once_across_repartitions_and_a_death(
    secret: bytes, teacher_file: Path
) -> None:
    spec = tiny_spec(samples=SAMPLES)
    control = LocalControl(SAMPLES, 1, 1, secret)
    teacher = load_teacher(teacher_file, TINY_TEACHER)
    stop = threading.Event()
    store = InProcessStore(secret=secret, pipeline="kd")
    producer = control.producer(0)
    runs: list[Run] = []

    def start_consumer(k: int, allowance: int | None, die_after: int | None = None) -> Paced:
        paced = Paced(control.consumer(k), allowance, die_after)
        runs.append(Run(lambda: consume(paced, spec, secret, evaluate=False, stop=stop, **QUIET)))
        return paced

    def acked(paced: Paced, n: int) -> None:
        assert control.wait_for(lambda _: len(paced.attempt.acked) >= n, WAIT_S), n

    making = Run(lambda: produce(producer, store, teacher, spec, stop=stop, **QUIET))
    try:
        first = start_consumer(0, allowance=8)
        acked(first, 8)  # phase 1: one consumer
        control.set_consumers(2)
        doomed = start_consumer(1, allowance=None, die_after=4)
        first.allow(16)
        acked(first, 16)  # phase 2: two consumers; consumer 1's attempt dies meanwhile
        runs[-1].join()
        assert isinstance(runs[-1].error, Died)
        control.end(doomed.attempt, completed=False)  # the worker saw its process exit
        lost = [sid for sid, _ in doomed.attempt.acked]
        assert len(lost) >= 4 and all(control.states()[sid] == "requeued" for sid in lost)
        control.set_consumers(3)  # phase 3: three consumers, consumer 1 again
        survivors = [first, start_consumer(1, allowance=None), start_consumer(2, allowance=None)]
        first.allow(None)
        for run in runs[2:] + runs[:1]:
            run.join()
            assert run.error is None, run.error
        for paced in survivors:
            control.end(paced.attempt, completed=True)
        making.join()
        assert making.error is None and isinstance(making.result, ProducerResult)
    finally:
        stop.set()
        for run in [making, *runs]:
            run.thread.join(timeout=WAIT_S)
        store.close()

    kept: list[ConsumerResult] = [runs[0].result, runs[2].result, runs[3].result]
    consumed = [sid for r in kept for sid in r.student.sample_ids]
    assert sorted(consumed) == [sample_id(i) for i in range(SAMPLES)]  # each exactly once
    assert all(r.student.steps > 0 and r.done for r in kept)  # all three trained, then done
    assert set(lost) <= set(consumed)  # what died with the attempt was trained on again
    assert making.result.reproduced >= len(lost)  # ... after being produced again
    assert set(control.states().values()) == {"committed"}
    counts = control.counts()
    assert counts["released"] == SAMPLES and counts["reproduced"] >= len(lost)
