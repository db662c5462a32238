"""Colocated and disaggregated distillation train the same student, bit for bit.

Colocated: teacher and student in one process, an ``InProcessStore`` and a ``LocalControl``
(the producer in a thread). Disaggregated: the producer is a separate process
(``produce_child.py``) putting into a ``SharedDirStore``; only refs come back (a file), which
the consumer here publishes on its own ``LocalControl`` and fetches from the directory.
Same samples, same order, same student: every per-step loss and every weight is equal.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import torch
from kdkit import TINY_TEACHER, tiny_spec

from trainfleet.features import InProcessStore
from trainfleet.features.ref import SampleRef
from trainfleet.pipeline.consumer import ConsumerResult, consume
from trainfleet.pipeline.control import LocalControl
from trainfleet.pipeline.distill import load_teacher
from trainfleet.pipeline.producer import ProducerResult, produce

CHILD = Path(__file__).with_name("produce_child.py")
QUIET = {"num_threads": 1, "poll_s": 0.01, "log": lambda _: None}


def colocated(spec, secret: bytes, teacher_file: Path, heldout) -> tuple[ConsumerResult, list]:
    control = LocalControl(spec.samples, 1, 1, secret)
    teacher = load_teacher(teacher_file, TINY_TEACHER)
    producer, consumer = control.producer(0), control.consumer(0)
    produced: list[ProducerResult] = []
    stop = threading.Event()
    with InProcessStore(secret=secret, pipeline="kd") as store:
        thread = threading.Thread(
            target=lambda: produced.append(
                produce(producer, store, teacher, spec, stop=stop, **QUIET)  # type: ignore[arg-type]
            )
        )
        thread.start()
        try:
            result = consume(consumer, spec, secret, heldout=heldout, **QUIET)  # type: ignore[arg-type]
            control.end(consumer, completed=True)
            thread.join(timeout=60)
            assert not thread.is_alive() and produced and not produced[0].stopped
        finally:
            stop.set()
            thread.join(timeout=60)
        assert store.stats().held_refs == 0  # the producer released every consumed sample
    return result, sorted(control.states().values())


def test_colocated_and_disaggregated_train_the_same_student_bit_for_bit(
    tmp_path: Path, secret: bytes, teacher_file: Path
) -> None:
    spec = tiny_spec(samples=10)
    heldout = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(1))
    together, states = colocated(spec, secret, teacher_file, heldout)
    assert states == ["committed"] * spec.samples

    root, refs_file = tmp_path / "store", tmp_path / "refs.jsonl"
    subprocess.run(
        [
            sys.executable,
            str(CHILD),
            spec.model_dump_json(),
            TINY_TEACHER.model_dump_json(),
            str(teacher_file),
            str(root),
            secret.hex(),
            str(refs_file),
        ],
        check=True,
        timeout=120,
    )
    refs = [SampleRef.model_validate_json(line) for line in refs_file.read_text().splitlines()]
    assert len(refs) == spec.samples and {r.store for r in refs} == {f"dir:{root.resolve()}"}
    control = LocalControl(spec.samples, 1, 1, secret, store=f"dir:{root}")
    publisher = control.producer(0)
    assert len(publisher.publish(refs).accepted) == spec.samples
    control.end(publisher, completed=True)
    apart = consume(control.consumer(0), spec, secret, heldout=heldout, **QUIET)  # type: ignore[arg-type]

    assert together.student.sample_ids == apart.student.sample_ids
    assert len(together.student.losses) == spec.samples
    assert together.student.losses == apart.student.losses  # exact float equality
    assert together.student.heldout_loss == apart.student.heldout_loss
    ours, theirs = together.student.model.state_dict(), apart.student.model.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
