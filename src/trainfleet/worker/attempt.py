"""Run one claimed attempt: the job's process group, its heartbeats and logs, then the report.

The job always runs in its own process (built-in ``train`` jobs too), under the shepherd
(:mod:`trainfleet.worker.process`), so its whole process group dies with the attempt however
it ends, and with the worker. A background thread heartbeats every interval; another ships
the job's output lines (:mod:`trainfleet.worker.logship`). Every report goes through one
``Reporter`` (:mod:`trainfleet.worker.report`) and ends accepted, fenced, refused or
unreachable:

- the heartbeat reply may say the job was cancelled, and a 409 says our claim was written
  off (fenced): in both cases the job is stopped and nothing more is reported;
- a refused report fails the attempt with the reason, cut to what the coordinator accepts;
- while the coordinator is unreachable the job keeps running until the worker-side lease
  (the coordinator's heartbeat timeout, on the monotonic clock, since the last heartbeat
  that was accepted) runs out: then the coordinator has requeued the attempt, so the job is
  stopped and the attempt dropped. A job that already finished keeps its result and tries
  to report it: the coordinator renews leases when it restarts.
- a full disk on the worker (preparing the attempt, writing ``output.log``, under 64 KiB free,
  packing the outputs) stops the job and hands it back, no failure counted, unless the job
  filled the disk itself (the rule is in :mod:`trainfleet.worker.disk`).

A ``replica`` job (one replica of one round of a collaborative DiLoCo run) runs the same way;
only its preparation and its payload differ (:mod:`trainfleet.worker.replica_task`): the
round's global weights are fetched into the worker's weights cache first (while heartbeats
run; the same outcomes apply to the download), and on exit 0 the pseudo-gradient file itself
is uploaded and reported with a ``contribution`` record. A ``referee`` job (one referee of a
market submission's panel) fetches the candidate and frontier models the same way
(:mod:`trainfleet.worker.referee_task`) and completes with its loss arrays, uploading nothing.
A ``producer`` or ``consumer`` job (one side of a pipeline) first attaches to its pipeline
and writes ``attach.json``, a producer also fetches its teacher model
(:mod:`trainfleet.worker.pipeline_task`); its output directory is then uploaded and
completed like a train job's.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter

from trainfleet import env
from trainfleet.artifacts import pack_dir, sha256_file
from trainfleet.client import Client, DownloadMismatch, TransferAborted
from trainfleet.data.prepare import CacheSettings
from trainfleet.data.spec import DatasetSpec
from trainfleet.data.verify import router_fit_id
from trainfleet.errors import ApiError, CoordinatorUnavailable
from trainfleet.worker import pipeline_task
from trainfleet.worker import referee_task as referee
from trainfleet.worker.disk import DISK_FULL_BYTES, free_bytes, job_filled_disk, tree_bytes
from trainfleet.worker.launch import (
    PipelineFiles,
    Prepared,
    RefereeFiles,
    ReplicaFiles,
    build_argv,
    build_env,
)
from trainfleet.worker.logship import LogLimits, LogSpool
from trainfleet.worker.process import JobProcess, ensure_dir, is_disk_full
from trainfleet.worker.replica_task import (
    PSEUDOGRAD_FILE,
    WeightsCache,
    contribution,
    prepare,
    replica_task,
)
from trainfleet.worker.report import Reply, Reporter, cut_text
from trainfleet.worker.result import MetricsError, read_metrics

log = logging.getLogger(__name__)
_Files = TypeVar("_Files", ReplicaFiles, RefereeFiles, PipelineFiles)

TERM_GRACE_S = 10.0
USAGE_ERROR_EXIT = 2  # a built-in trainer exiting 2 rejected its parameters: never retried
REFUSED_EXIT = 3  # a built-in trainer exiting 3 refused its data (a wrong router): never retried
NOT_RETRIED_EXITS = (USAGE_ERROR_EXIT, REFUSED_EXIT)
# Programs of ours: exits 2 and 3 mean the above.
BUILTIN_KINDS = ("train", "replica", "referee", "producer", "consumer")
REPORT_PATIENCE_S = 3600.0  # how long a finished attempt keeps trying to report
LOG_FLUSH_S = 0.5
DISK_CHECK_S = 1.0
POLL_S = 0.2


@dataclass
class Outcome:
    """How an attempt ended, from this worker's point of view."""

    status: str  # completed | failed | cancelled | fenced | released | lost | unreported
    detail: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    disk_full: bool = False  # it ended because the worker's disk was full


class Attempt:
    """One claimed attempt of one job on this worker."""

    def __init__(
        self,
        client: Client,
        claim: dict[str, Any],
        workdir: Path,
        *,
        heartbeat_interval_s: float,
        num_threads: int,
        stop: threading.Event,
        data: CacheSettings | None = None,
        lease_s: float | None = None,
        limits: LogLimits | None = None,
        reporter: Reporter | None = None,
        term_grace_s: float = TERM_GRACE_S,
        report_patience_s: float = REPORT_PATIENCE_S,
        may_hand_back_disk: bool = True,
        max_mbps: float | None = None,
        weights: WeightsCache | None = None,
    ):
        self.client = client
        self.claim = claim
        self.job = claim["job"]
        self.job_id: str = self.job["id"]
        self.epoch: int = claim["epoch"]
        self.spec = self.job["spec"]
        self.workdir = workdir
        self.dir = workdir / "jobs" / f"{self.job_id[:12]}-a{claim['attempt']}"
        self.output_dir = self.dir / "output"
        self.heartbeat_interval_s = heartbeat_interval_s
        self.num_threads = num_threads
        self.data = data or CacheSettings(directory=workdir / "cache")
        self.data_env = self.data.to_env()
        self.max_mbps = max_mbps  # the worker's link cap, handed to replica programs
        self.weights = weights or WeightsCache(
            (self.data.directory or workdir / "cache") / "weights"
        )
        self.stop = stop  # set by the daemon on SIGTERM: hand the job back
        self.lease_s = lease_s  # the coordinator's heartbeat timeout
        self.limits = limits or LogLimits()
        self.reporter = reporter or Reporter(stop)
        self.term_grace_s = term_grace_s
        self.report_patience_s = report_patience_s
        self.may_hand_back_disk = may_hand_back_disk  # False: a full disk counts (disk.py)
        self.free_at_start: int | None = None  # free bytes when the job's process started
        self.cancelled = threading.Event()
        self.fenced = threading.Event()
        self.refused: str | None = None  # why the coordinator refused a heartbeat
        self.lease_renewed_at = time.monotonic()  # when the last accepted heartbeat was sent
        self._done = threading.Event()
        self.spool = LogSpool(self.limits)
        self._dropped_noted = False
        self._disk_checked_at = float("-inf")
        self._disk_error: OSError | None = None
        self._ship_lock = threading.Lock()
        self._tail: deque[str] = deque(maxlen=20)

    @property
    def name(self) -> str:
        return str(self.job["name"])

    # background threads -----------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._done.is_set():
            sent_at = time.monotonic()
            reply = self.reporter.send(
                f"heartbeat of {self.name}",
                lambda: self.client.heartbeat(self.job_id, self.epoch),
                retry=False,
            )
            if reply.accepted:
                self.lease_renewed_at = sent_at
                self._adopt_pace(reply.value or {})
                if reply.value and reply.value.get("cancel"):
                    log.warning("job %s was cancelled by the operator", self.name)
                    self.cancelled.set()
                    return
            elif reply.outcome == "fenced":
                log.warning("job %s: claim written off (%s)", self.name, reply.reason)
                self.fenced.set()
                return
            elif reply.outcome == "refused":
                self.refused = f"coordinator refused a heartbeat: {reply.reason}"
                return
            else:
                log.warning("heartbeat failed, will retry: %s", reply.reason)
            self._done.wait(self.heartbeat_interval_s)

    def _adopt_pace(self, reply: dict[str, Any]) -> None:
        """Keep the interval and lease the coordinator sends with each reply: they grow with
        the fleet (``coordinator.beats``). An older coordinator sends neither."""
        interval, lease = reply.get("heartbeat_interval_s"), reply.get("heartbeat_timeout_s")
        if isinstance(interval, int | float) and interval > 0:
            self.heartbeat_interval_s = float(interval)
        if isinstance(lease, int | float) and lease > 0:
            self.lease_s = float(lease)

    def lease_expired(self) -> bool:
        """No heartbeat accepted for longer than the coordinator waits before requeueing."""
        return self.lease_s is not None and time.monotonic() - self.lease_renewed_at > self.lease_s

    def _ship_logs_loop(self) -> None:
        while not self._done.wait(LOG_FLUSH_S):
            self.ship_logs(retry=False)

    def ship_logs(self, *, retry: bool, patience_s: float | None = None) -> None:
        """Send the spooled lines, in batches the coordinator accepts."""
        with self._ship_lock:
            while not (self.fenced.is_set() or self.cancelled.is_set()):
                lines, mark = self.spool.batch()
                if not lines:
                    return
                reply = self.reporter.send(
                    f"log lines of {self.name}",
                    partial(self.client.append_log, self.job_id, self.epoch, lines),
                    retry=retry,
                    patience_s=patience_s,
                    give_up=self.fenced.is_set,
                )
                if reply.outcome == "fenced":
                    self.fenced.set()
                    return
                if reply.outcome == "unreachable":
                    return  # kept in the spool for the next try
                if reply.outcome == "refused":  # counted as dropped, never silently
                    self.spool.dropped += len(lines)
                self.spool.commit(mark)

    def _add_line(self, line: str) -> None:
        self._tail.append(line)
        self.spool.add(line)

    # the attempt ----------------------------------------------------------------------------
    def _fetch_router(self) -> None:
        """Hand the job the router the coordinator published for its dataset, if any."""
        dataset = self.spec.get("dataset")
        if self.spec["kind"] != "train" or not dataset or not dataset.get("router"):
            return
        fit_id = router_fit_id(TypeAdapter[Any](DatasetSpec).validate_python(dataset))
        try:
            router = self.client.get_router(fit_id)
        except (ApiError, CoordinatorUnavailable) as err:
            log.warning("no router from the coordinator (%s): the job fits its own", err)
            return
        if router is not None:
            router_file = self.dir / "router.json"
            router_file.write_text(json.dumps(router))
            self.data_env[env.ROUTER_FILE] = str(router_file)

    def run(self) -> Outcome:
        threads = [
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
            threading.Thread(target=self._ship_logs_loop, name="logs", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            try:
                ensure_dir(self.output_dir)
                self._fetch_router()
            except OSError as err:
                if is_disk_full(err):
                    return self._disk_full("preparing the attempt", err, started=False)
                return self._fail(_disk_message("preparing the attempt", err))
            replica: Prepared | None = None
            if self.spec["kind"] in ("replica", "referee", *pipeline_task.PIPELINE_KINDS):
                prepared = self._prepare()
                if isinstance(prepared, Outcome):
                    return prepared
                replica = prepared
            self.free_at_start = free_bytes(self.dir)
            argv = build_argv(self.spec, self.output_dir, replica)
            log.info(
                "running %s (attempt %d, epoch %d): %s",
                self.name,
                self.claim["attempt"],
                self.epoch,
                " ".join(argv[:6]),
            )
            returncode, stopped_by, disk_error = self._run_process(argv)
            # Heartbeats go on until the report lands: a result waiting out a coordinator
            # outage keeps its lease the moment the coordinator is back.
            return self._report(returncode, stopped_by, disk_error)
        finally:
            self._done.set()
            for t in threads:
                t.join(timeout=30)

    def _prepare(self) -> Prepared | Outcome:
        """The files a replica, referee or pipeline program starts with, or how the attempt
        ended if they could not be had."""
        kind = self.spec["kind"]
        if kind == "replica":
            return self._prepare_replica()
        if kind == "referee":
            return self._prepare_referee()
        return self._prepare_pipeline()

    def _prepare_pipeline(self) -> PipelineFiles | Outcome:
        """Attach to the pipeline, write ``attach.json`` (0600), fetch a producer's teacher
        model, while heartbeats go on (``worker.pipeline_task``)."""
        cache = referee.models_cache(self.weights)
        ca = getattr(self.client, "ca_cert", None)
        return self._fetch(
            "pipeline attach",
            lambda give_up: pipeline_task.prepare(
                self.job_id,
                self.epoch,
                self.spec["kind"],
                self.dir,
                cache,
                self.client,
                self.client.url,
                None if ca is None else str(Path(ca).resolve()),  # the job has its own cwd
                give_up,
            ),
        )

    def _prepare_replica(self) -> ReplicaFiles | Outcome:
        """The replica program's files (weights fetched while heartbeats go on), or how
        the attempt ended if they could not be had."""
        try:
            task = replica_task(self.spec)
        except ValueError as err:
            return self._fail(f"malformed replica task: {err}", retryable=False)
        return self._fetch(
            "weights",
            lambda give_up: prepare(
                task, self.dir, self.workdir, self.weights, self.client, give_up
            ),
        )

    def _prepare_referee(self) -> RefereeFiles | Outcome:
        """The referee program's files (both models fetched while heartbeats go on), or how
        the attempt ended if they could not be had."""
        try:
            task = referee.referee_task(self.spec)
        except ValueError as err:
            return self._fail(f"malformed referee task: {err}", retryable=False)
        cache = referee.models_cache(self.weights)
        return self._fetch(
            "models",
            lambda give_up: referee.prepare(task, self.dir, cache, self.client, give_up),
        )

    def _fetch(self, what: str, fetch: Callable[[Callable[[], bool]], _Files]) -> _Files | Outcome:
        """Run ``fetch(give_up)`` (a download) under the reporter's patience: its value, or
        how the attempt ended."""

        def give_up() -> bool:  # the attempt ended meanwhile: stop downloading
            return self._why_stop(float("inf")) is not None

        try:
            reply = self.reporter.send(
                f"{what} download of {self.name}",
                lambda: fetch(give_up),
                patience_s=self.report_patience_s,
                give_up=give_up,
            )
        except TransferAborted:
            return self._report(-1, self._why_stop(float("inf")) or "lease", self._disk_error)
        except DownloadMismatch as err:
            return self._fail(str(err))
        except OSError as err:
            if is_disk_full(err):
                return self._disk_full(f"fetching the {what}", err, started=False)
            return self._fail(_disk_message(f"fetching the {what}", err))
        if reply.accepted and reply.value is not None:
            return reply.value
        if reply.outcome == "refused":
            return self._fail(f"coordinator refused the {what}: {reply.reason}")
        if reply.outcome == "fenced":
            return Outcome("fenced", f"{self.name}: stopped, nothing reported")
        stopped_by = self._why_stop(float("inf")) or "lease"  # out of patience: it is lost
        return self._report(-1, stopped_by, self._disk_error)

    def _why_stop(self, deadline: float, proc: JobProcess | None = None) -> str | None:
        if self.cancelled.is_set():
            return "cancelled"
        if self.fenced.is_set():
            return "fenced"
        if self.refused is not None:
            return "refused"
        if self.stop.is_set():
            return "released"
        if (proc is not None and proc.disk_error is not None) or self._disk_is_full():
            return "disk_full"
        if self.lease_expired():
            return "lease"
        if time.monotonic() > deadline:
            return "timeout"
        return None

    def _disk_is_full(self) -> bool:
        """No room left where the attempt writes (checked at most once a second)."""
        now = time.monotonic()
        if now < self._disk_checked_at + DISK_CHECK_S:
            return False
        self._disk_checked_at = now
        free = free_bytes(self.dir)
        if free is None or free >= DISK_FULL_BYTES:
            return False
        self._disk_error = OSError(errno.ENOSPC, f"{free} bytes free under {self.dir}")
        return True

    def _run_process(self, argv: list[str]) -> tuple[int, str | None, OSError | None]:
        proc = JobProcess(
            argv,
            env=build_env(
                self.claim, self.output_dir, self.num_threads, self.data_env, self.max_mbps
            ),
            log_path=self.dir / "output.log",
            on_line=self._add_line,
            grace_s=self.term_grace_s,
        )
        deadline = time.monotonic() + float(self.spec["timeout_s"])
        stopped_by = None
        try:
            while proc.wait(POLL_S) is None:
                stopped_by = self._why_stop(deadline, proc)
                if stopped_by is not None:
                    if stopped_by == "lease":
                        log.error(
                            "job %s: no heartbeat accepted for %.0fs (the coordinator's"
                            " heartbeat timeout): it has requeued this attempt; stopping the job",
                            self.name,
                            time.monotonic() - self.lease_renewed_at,
                        )
                    proc.stop()
                    break
        except BaseException:  # a second SIGTERM (SystemExit) or a bug: no job left behind
            proc.kill()
            raise
        finally:
            returncode = proc.finish()  # the whole group is gone past this point
        return returncode, stopped_by, proc.disk_error or self._disk_error

    def _report(
        self, returncode: int, stopped_by: str | None, disk_error: OSError | None
    ) -> Outcome:
        """Tell the coordinator how the attempt ended (unless it no longer wants to know)."""
        if stopped_by in ("cancelled", "fenced"):
            return Outcome(stopped_by, f"{self.name}: stopped, nothing reported")
        if stopped_by == "lease":
            return Outcome("lost", f"{self.name}: lease lost, stopped and dropped")
        if stopped_by == "released":
            self._final_logs(retry=False)
            reply = self._send_fail("worker shutting down: job handed back", release=True)
            return Outcome("released", f"{self.name}: handed back ({reply.outcome})")
        if stopped_by == "refused":
            return self._fail(self.refused or "refused")
        if disk_error is not None and (stopped_by == "disk_full" or is_disk_full(disk_error)):
            return self._disk_full("running the job", disk_error, started=True)
        if stopped_by == "timeout":
            return self._fail(f"timed out after {self.spec['timeout_s']:g}s")
        if returncode != 0:
            tail = "\n".join(list(self._tail)[-5:])
            error = f"exit code {returncode}" + (f"; last output:\n{tail}" if tail else "")
            retryable = not (self.spec["kind"] in BUILTIN_KINDS and returncode in NOT_RETRIED_EXITS)
            return self._fail(error, retryable=retryable)
        return self._upload_and_complete()

    def _final_logs(self, *, retry: bool) -> int:
        """Ship what is left, then report how many lines were dropped, if any."""
        if self.spool.dropped and not self._dropped_noted:
            self._dropped_noted = True
            self.spool.add(f"[trainfleet] {self.spool.dropped} log lines dropped")
        self.ship_logs(retry=retry, patience_s=self.report_patience_s)
        if len(self.spool):  # the coordinator never came back for them
            self.spool.dropped += len(self.spool)
            self.spool.clear()
        return self.spool.dropped

    def _send(self, what: str, call: Callable[[], Any]) -> Reply[Any]:
        return self.reporter.send(
            f"{what} of {self.name}",
            call,
            patience_s=self.report_patience_s,
            give_up=self.fenced.is_set,
        )

    def _send_fail(
        self, error: str, *, retryable: bool = True, release: bool = False
    ) -> Reply[Any]:
        error = cut_text(error, self.limits.max_error_chars)
        return self._send(
            "failure report",
            lambda: self.client.fail(
                self.job_id, self.epoch, error, retryable=retryable, release=release
            ),
        )

    def _fail(self, error: str, *, retryable: bool = True) -> Outcome:
        dropped = self._final_logs(retry=True)
        if dropped:
            error = f"{error}\n({dropped} log lines dropped)"
        error = cut_text(error, self.limits.max_error_chars)
        reply = self._send_fail(error, retryable=retryable)
        return self._after_report(reply, Outcome("failed", error))

    def _disk_full(self, doing: str, err: OSError, *, started: bool) -> Outcome:
        """The worker's disk is full: hand the job back, unless the job filled it itself or
        this worker handed it back too often already (:mod:`trainfleet.worker.disk`)."""
        error = _disk_message(doing, err)
        used = tree_bytes(self.dir) if started else 0
        if started and job_filled_disk(used, self.free_at_start):
            outcome = self._fail(
                f"{error} (the attempt's own files take {used} bytes of the"
                f" {self.free_at_start} that were free when it started)"
            )
        elif not self.may_hand_back_disk:
            outcome = self._fail(f"{error} (handed back for a full disk too often here)")
        else:
            log.warning("job %s: %s: handing it back", self.name, error)
            self._final_logs(retry=True)
            reply = self._send_fail(f"{error}; job handed back", release=True)
            outcome = self._after_report(reply, Outcome("released", error))
        outcome.disk_full = True
        return outcome

    def _after_report(self, reply: Reply[Any], outcome: Outcome) -> Outcome:
        if reply.accepted:
            return outcome
        if reply.outcome == "fenced":
            return Outcome("fenced", f"{self.name}: written off before the report landed")
        return Outcome("unreported", f"{outcome.status} but not reported: {reply.reason}")

    def _package(self) -> tuple[Path, str, int] | Outcome:
        """What to upload, its sha256 and size: a replica's pseudo-gradient file itself (the
        coordinator decodes it), any other job's output directory packed."""
        replica = self.spec["kind"] == "replica"
        if replica:
            path, doing = self.output_dir / PSEUDOGRAD_FILE, "hashing the pseudo-gradient"
            if not path.is_file():
                return self._fail(
                    f"the replica program exited 0 without writing output/{PSEUDOGRAD_FILE}",
                    retryable=False,
                )
        else:
            path, doing = self.dir / "outputs.tar.zst", "packing the outputs"
        try:
            sha256, size = sha256_file(path) if replica else pack_dir(self.output_dir, path)
        except OSError as err:
            if is_disk_full(err):
                return self._disk_full(doing, err, started=True)
            return self._fail(_disk_message(doing, err))
        return path, sha256, size

    def _upload_and_complete(self) -> Outcome:
        try:
            metrics, non_finite = read_metrics(self.output_dir / "metrics.json")
        except MetricsError as err:
            return self._fail(str(err), retryable=False)
        if self.spec["kind"] == "referee":  # its losses are its result: nothing to upload
            return self._complete(referee.referee_result(metrics, non_finite), "losses reported")
        packaged = self._package()
        if isinstance(packaged, Outcome):
            return packaged
        payload, sha256, size = packaged
        upload = self._send(
            "upload",
            lambda: self.client.upload(self.job_id, self.epoch, payload, sha256, payload.name),
        )
        if upload.outcome == "refused":
            return self._fail(f"coordinator refused the artifact: {upload.reason}")
        if not upload.accepted:
            return self._after_report(upload, Outcome("failed"))
        dropped = self._final_logs(retry=True)
        result: dict[str, Any] = {"metrics": metrics, "artifact": sha256, "artifact_size": size}
        if self.spec["kind"] == "replica":
            result["contribution"] = contribution(replica_task(self.spec), metrics, payload, size)
        if non_finite:
            result["non_finite"] = non_finite
        if dropped:
            result["dropped_log_lines"] = dropped
        return self._complete(result, f"artifact {sha256[:12]} ({size} bytes)")

    def _complete(self, result: dict[str, Any], detail: str) -> Outcome:
        reply = self._send("result", lambda: self.client.complete(self.job_id, self.epoch, result))
        if reply.outcome == "refused":
            return self._fail(f"coordinator refused the result: {reply.reason}")
        return self._after_report(reply, Outcome("completed", detail, result))


def _disk_message(doing: str, err: OSError) -> str:
    if is_disk_full(err):
        return f"disk full on worker: {doing}: {err}"
    return f"worker error {doing}: {err}"


__all__ = ["Attempt", "Outcome", "build_argv", "build_env"]
