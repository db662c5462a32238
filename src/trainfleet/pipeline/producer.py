"""A pipeline's teacher producer: ``python -m trainfleet.pipeline.producer --attach FILE
--teacher MODEL.safetensors --output DIR``.

This is what a worker starts for a ``kind = "producer"`` job. ``produce`` is the loop (the
colocated mode and the tests call it directly): ``sync`` with the control plane, reporting
the refs released since the last sync -> release the refs it answers in the store -> compute
the teacher's top-k tensors of each sample index it answers (``distill``), ``put`` them with
a short wait and ``publish`` the refs in batches -> again, until the control plane says this
producer's share is committed and released. A put refused by backpressure (the store is over
its high watermark) sends the loop back to ``sync``, whose answer frees what consumers have
trained on. A sample produced again (its consumer died) first aborts the old bytes.

The store (``attach.spec.store``): ``"http"`` is an ``InProcessStore`` served by a
``FeatureServer`` bound to ``$TRAINFLEET_FEATURE_HOST`` (default 127.0.0.1) and advertised in
refs as ``$TRAINFLEET_FEATURE_ADVERTISE`` (default: the bind host); ``"dir:PATH"`` is a
``SharedDirStore`` at PATH. Either way guarded by the pipeline's secret and watermarks.

Writes ``metrics.json`` (produced, reproduced, bytes, ...) in the output directory. Exit codes
(``attach.run_program``): 2 bad attach / teacher file / settings, 75 written off by the
coordinator, 1 data, store or coordinator trouble.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from trainfleet import env
from trainfleet.errors import Backpressure, FeatureError
from trainfleet.features import FeatureStore, InProcessStore, SharedDirStore
from trainfleet.features.ref import SampleRef
from trainfleet.manifest.pipelines import PipelineSpec, sample_id
from trainfleet.pipeline.attach import (
    Attach,
    AttachError,
    checked_student,
    load_attach,
    num_threads_from_env,
    run_program,
)
from trainfleet.pipeline.control import PipelineControl
from trainfleet.pipeline.distill import (
    SampleWindows,
    load_teacher,
    prepare,
    student_params,
    teacher_topk,
)
from trainfleet.train.model import GPT
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import METRICS_FILE, deterministic_torch

PROG = "trainfleet.pipeline.producer"
MIB = 1 << 20
PUBLISH_BATCH = 16  # refs per publish call
PUT_WAIT_S = 1.0  # how long a put waits over the high watermark before going back to sync
POLL_S = 0.5  # pause when there is nothing to produce or release


@dataclass
class ProducerResult:
    produced: int = 0  # samples put and accepted by the control plane
    reproduced: int = 0  # of those, samples produced again (their first copy was lost)
    bytes: int = 0  # encoded bytes of the accepted samples
    released: int = 0  # refs released on the control plane's word
    skipped: int = 0  # refs the control plane skipped (already published)
    backpressure: int = 0  # puts refused over the high watermark
    stopped: bool = False  # ``stop`` was set before the share finished
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def produce(
    control: PipelineControl,
    store: FeatureStore,
    teacher: GPT,
    spec: PipelineSpec,
    *,
    windows: SampleWindows | None = None,
    num_threads: int | None = None,
    publish_batch: int = PUBLISH_BATCH,
    put_wait_s: float = PUT_WAIT_S,
    poll_s: float = POLL_S,
    stop: threading.Event | None = None,
    log: Callable[[str], None] = print,
) -> ProducerResult:
    """Produce this producer's share of ``spec``'s samples into ``store`` until the control
    plane says it is finished (module doc), or ``stop`` is set."""
    started = time.perf_counter()
    params = student_params(spec)
    if windows is None:
        windows = SampleWindows(
            prepare(spec.dataset, log), params.batch_size, params.seq_len, spec.seed
        )
    stop = stop or threading.Event()
    result = ProducerResult()
    current: dict[int, SampleRef] = {}  # idx -> the ref of its latest put
    ever: set[int] = set()  # indices accepted at least once
    released: list[str] = []
    while not stop.is_set():
        answer = control.sync(released)
        released = []
        for ref in answer.release:
            try:
                store.release(ref)  # False: already freed (collected, aborted): nothing to do
            except FeatureError as e:  # the ref names a store that died with an old attempt
                log(f"release {ref.sample_id}: {e}")
            released.append(ref.sample_id)
            result.released += 1
        if answer.finished:
            break
        if not answer.produce:
            if not released:
                stop.wait(poll_s)
            continue
        batch: list[SampleRef] = []
        for idx in answer.produce:
            if stop.is_set():
                break
            old = current.pop(idx, None)
            if old is not None:
                with contextlib.suppress(FeatureError):  # already freed
                    store.abort(old)
            with deterministic_torch(spec.seed, num_threads):
                tensors = teacher_topk(teacher, windows.tokens(idx), spec.top_k, spec.temperature)
            try:
                ref = store.put(sample_id(idx), tensors, wait_s=put_wait_s)
            except Backpressure:
                result.backpressure += 1
                break
            current[idx] = ref
            batch.append(ref)
            if len(batch) >= publish_batch:
                _publish(control, batch, ever, result, log)
                batch = []
        _publish(control, batch, ever, result, log)
    result.stopped = stop.is_set()
    result.elapsed_s = time.perf_counter() - started
    log(
        f"producer: {result.produced} samples ({result.reproduced} again), "
        f"{result.bytes / MIB:.1f} MiB, {result.released} released in {result.elapsed_s:.1f}s"
    )
    return result


def _publish(
    control: PipelineControl,
    refs: list[SampleRef],
    ever: set[int],
    result: ProducerResult,
    log: Callable[[str], None],
) -> None:
    if not refs:
        return
    reply = control.publish(refs)
    by_id = {r.sample_id: r for r in refs}
    for sid in reply.accepted:
        idx = int(sid)
        result.produced += 1
        result.reproduced += idx in ever
        result.bytes += by_id[sid].size
        ever.add(idx)
    for sid, reason in reply.skipped:
        result.skipped += 1
        log(f"publish {sid} skipped: {reason}")


def make_store(
    spec: PipelineSpec, secret: bytes, pipeline_id: str, stack: ExitStack
) -> FeatureStore:
    """The producer's store for ``spec.store`` (module doc); closed when ``stack`` closes."""
    guards: dict[str, Any] = {
        "secret": secret,
        "pipeline": pipeline_id,
        "high_watermark_bytes": int(spec.high_watermark_mib * MIB),
        "low_watermark_bytes": int(spec.low_watermark_mib * MIB),
        "max_age_s": spec.max_ref_age_s,
    }
    if spec.store.startswith("dir:"):
        return stack.enter_context(SharedDirStore(spec.store[len("dir:") :], **guards))
    from trainfleet.features.http import FeatureServer  # imports uvicorn only when needed

    store = stack.enter_context(InProcessStore(**guards))
    host = os.environ.get(env.FEATURE_HOST) or "127.0.0.1"
    advertise = os.environ.get(env.FEATURE_ADVERTISE) or None
    server = FeatureServer(store, secret, host=host, port=0, advertise=advertise).start()
    stack.callback(server.stop)  # sets store.address: refs name the server
    return store


def _teacher(path: Path, params: GPTParams, attach: Attach) -> GPT:
    student = checked_student(attach)
    if student.seq_len > params.seq_len:
        raise AttachError(
            f"student seq_len {student.seq_len} exceeds the teacher's {params.seq_len}"
        )
    try:
        return load_teacher(path, params)
    except (OSError, SafetensorError, RuntimeError) as e:
        raise AttachError(f"cannot load --teacher {path} as the teacher's weights: {e}") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__)
    parser.add_argument("--attach", required=True, type=Path, help="the worker's attach.json")
    parser.add_argument("--teacher", required=True, type=Path, help="teacher model.safetensors")
    parser.add_argument("--output", required=True, type=Path, help="directory for metrics.json")
    args = parser.parse_args(argv)

    def work() -> None:
        attach = load_attach(args.attach, "producer")
        num_threads = num_threads_from_env()
        assert attach.teacher_params is not None  # load_attach checks it for a producer
        teacher = _teacher(args.teacher, attach.teacher_params, attach)
        from trainfleet.pipeline.client import HttpControl

        with ExitStack() as stack:
            store = make_store(attach.spec, attach.secret_bytes, attach.pipeline_id, stack)
            control = stack.enter_context(
                HttpControl(attach.coordinator, attach.attempt_token, attach.pipeline_id, attach.ca)
            )
            print(f"producer {attach.index} of {attach.name}: store {store.address}", flush=True)
            result = produce(
                control, store, teacher, attach.spec, num_threads=num_threads, log=_log
            )
        args.output.mkdir(parents=True, exist_ok=True)
        metrics = {**result.as_dict(), "producer": attach.index, "store": attach.spec.store}
        (args.output / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")

    return run_program(work, PROG)


def _log(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
