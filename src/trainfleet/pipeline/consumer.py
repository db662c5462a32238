"""A pipeline's student consumer: ``python -m trainfleet.pipeline.consumer --attach FILE
--output DIR``.

This is what a worker starts for a ``kind = "consumer"`` job. ``consume`` is the loop (the
colocated mode and the tests call it directly): ``lease`` refs -> for each, in index order,
``get`` its tensors from the store the ref names (a ``FeatureError``, e.g. the sample is gone
or its producer's server died: ``return`` it, the producer makes it again) -> ``ack`` it at
this consumer's step *before* training on it (refused: skip it, someone else owns it) -> one
student step (``distill.train_student``) -> until the control plane retires this consumer
(the consumer count went below its index) or says every sample is consumed. Then the
student's held-out loss is measured and ``model.safetensors`` + ``config.json`` (as
``trainer.save_checkpoint`` writes them, so the market and referee tools read them) and
``metrics.json`` ({steps, samples, train_loss, heldout_loss, losses, ...}) are written.

Acking first is what makes delivery exactly-once per kept model: an acked sample belongs to
this attempt; if the attempt dies, the queue requeues everything it acked and its model is
discarded, so no kept model trains on a sample twice and none is lost. Exit codes as the
producer's.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainfleet.errors import BadRef, FeatureError
from trainfleet.features import FeatureStore, open_store
from trainfleet.features.ref import SampleRef
from trainfleet.manifest.pipelines import PipelineSpec
from trainfleet.pipeline.attach import (
    checked_student,
    load_attach,
    num_threads_from_env,
    run_program,
)
from trainfleet.pipeline.control import PipelineControl
from trainfleet.pipeline.distill import (
    SampleWindows,
    StudentResult,
    evaluate_student,
    prepare,
    student_params,
    train_student,
)
from trainfleet.train.trainer import METRICS_FILE, save_checkpoint

PROG = "trainfleet.pipeline.consumer"
LEASE_BATCH = 4  # refs per lease: few, so a re-partition moves work quickly
POLL_S = 0.5  # pause when nothing is ready yet


@dataclass
class ConsumerResult:
    student: StudentResult
    returned: list[str] = field(default_factory=list)  # samples whose get failed
    refused: list[str] = field(default_factory=list)  # acks the control plane refused
    retired: bool = False  # stopped because the consumer count fell below its index
    done: bool = False  # stopped because every sample was consumed
    stopped: bool = False  # ``stop`` was set

    def metrics(self) -> dict[str, Any]:
        s = self.student
        return {
            "steps": s.steps,
            "samples": s.sample_ids,
            "train_loss": s.train_loss,
            "heldout_loss": s.heldout_loss,
            "losses": s.losses,
            "ce_losses": s.ce_losses,
            "returned": self.returned,
            "refused": self.refused,
            "retired": self.retired,
            "done": self.done,
            "train_s": s.train_s,
            "num_params": s.model.num_params(),
        }


class _Stores:
    """The stores refs name, opened once each; closes those it opened (not in-process ones,
    which belong to their producer)."""

    def __init__(
        self,
        secret: bytes,
        opener: Callable[..., FeatureStore],
        spec: PipelineSpec | None = None,
    ):
        self.secret = secret
        self.spec = spec
        self.opener = opener
        self.open: dict[str, FeatureStore] = {}

    def get(self, ref: SampleRef) -> dict[str, torch.Tensor]:
        store = self.open.get(ref.store)
        if store is None:
            # only the pipeline's own store (never a local dir or URL a producer made up)
            problem = self.spec.ref_store_problem(ref.store) if self.spec else None
            if problem:
                raise BadRef(f"sample {ref.sample_id}: {problem}")
            store = self.open[ref.store] = self.opener(ref.store, self.secret)
        return store.get(ref)

    def close(self) -> None:
        for address, store in self.open.items():
            if not address.startswith("mem:"):
                store.close()


def consume(
    control: PipelineControl,
    spec: PipelineSpec,
    secret: bytes,
    *,
    output_dir: Path | None = None,
    heldout: torch.Tensor | None = None,
    evaluate: bool = True,
    num_threads: int | None = None,
    lease_batch: int = LEASE_BATCH,
    poll_s: float = POLL_S,
    stop: threading.Event | None = None,
    opener: Callable[..., FeatureStore] = open_store,
    check_store: bool = False,
    log: Callable[[str], None] = print,
) -> ConsumerResult:
    """Train a student on the samples this consumer leases (module doc); write its outputs
    to ``output_dir`` when given. Held-out tokens come from ``heldout`` or, with ``evaluate``,
    from the dataset's held-out split. With ``check_store`` (the worker program), a ref is
    only opened if it names the pipeline's own kind of store (``spec.ref_store_problem``):
    otherwise it is returned like one whose get failed."""
    params = student_params(spec)
    stop = stop or threading.Event()
    stores = _Stores(secret, opener, spec if check_store else None)
    outcome: dict[str, bool] = {}
    returned: list[str] = []
    refused: list[str] = []

    def samples() -> Iterator[tuple[str, Mapping[str, torch.Tensor]]]:
        step = 0
        while not stop.is_set():
            lease = control.lease(lease_batch)
            if not lease.samples:
                if lease.retire or lease.done:
                    outcome.update(retired=lease.retire, done=lease.done)
                    return
                stop.wait(poll_s)
                continue
            for ref in sorted(lease.samples, key=lambda r: r.sample_id):
                try:
                    tensors = stores.get(ref)
                except FeatureError as e:
                    log(f"get {ref.sample_id} failed ({e}); returning it")
                    control.return_samples([ref.sample_id])
                    returned.append(ref.sample_id)
                    continue
                [answer] = control.ack([(ref.sample_id, step)])
                if not answer.accepted:
                    log(f"ack {ref.sample_id} refused: {answer.reason}")
                    refused.append(ref.sample_id)
                    continue
                yield ref.sample_id, tensors
                step += 1

    try:
        student = train_student(samples(), params, spec, num_threads=num_threads, log=log)
    finally:
        stores.close()
    if heldout is None and evaluate:
        windows = SampleWindows(
            prepare(spec.dataset, log), params.batch_size, params.seq_len, spec.seed
        )
        heldout = windows.heldout(params.eval_batches * params.batch_size)
    if heldout is not None:
        student.heldout_loss = evaluate_student(student.model, params, heldout, num_threads)
    result = ConsumerResult(
        student=student,
        returned=returned,
        refused=refused,
        retired=outcome.get("retired", False),
        done=outcome.get("done", False),
        stopped=stop.is_set(),
    )
    if output_dir is not None:
        write_outputs(result, output_dir)
    log(
        f"consumer: {student.steps} steps, train loss {student.train_loss}, held-out loss "
        f"{student.heldout_loss}, {len(returned)} returned, {len(refused)} refused"
    )
    return result


def write_outputs(result: ConsumerResult, output_dir: Path) -> None:
    """``model.safetensors`` + ``config.json`` (the trainer's format) and ``metrics.json``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(result.student.model, result.student.params, "distill", output_dir)
    (output_dir / METRICS_FILE).write_text(json.dumps(result.metrics(), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__)
    parser.add_argument("--attach", required=True, type=Path, help="the worker's attach.json")
    parser.add_argument("--output", required=True, type=Path, help="directory for outputs")
    args = parser.parse_args(argv)

    def work() -> None:
        attach = load_attach(args.attach, "consumer")
        num_threads = num_threads_from_env()
        checked_student(attach)  # a bad student table fails here, before any lease
        from trainfleet.pipeline.client import HttpControl

        with HttpControl(
            attach.coordinator, attach.attempt_token, attach.pipeline_id, attach.ca
        ) as control:
            print(f"consumer {attach.index} of {attach.name}", flush=True)
            consume(
                control,
                attach.spec,
                attach.secret_bytes,
                output_dir=args.output,
                num_threads=num_threads,
                check_store=True,
                log=_log,
            )

    return run_program(work, PROG)


def _log(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
