"""The worker daemon behind ``trainfleet join URL``.

Detect capability, register, then loop: claim, run the attempt, report. Every request goes
through one ``Reporter``: it reconnects with exponential backoff (capped, jittered, cut short
by SIGTERM) whenever the coordinator is unreachable, and nothing the coordinator answers
kills the daemon: it re-registers if its credential is no longer known, and a claim refused
because this worker "still holds" a job (an attempt whose report never landed) fails that job
so it can run again, then claims anew. A claim whose reply was lost is simply asked again:
the coordinator hands back the claim this worker already holds. An idle worker's claim is a
long poll (``claim_wait_s``): the coordinator answers as soon as work arrives, or with no
claim once the wait has passed, so a worker neither polls every second nor waits for work
that is there. On SIGTERM or SIGINT it stops claiming (a long poll in flight is cut short:
the coordinator hands a client that hung up no job), stops the running job and hands it back
(no failure counted), deregisters and exits 0. Attempt directories are removed once their
result is accepted; the last ``keep_failed_attempts`` others are kept for debugging.

Before each claim the daemon checks that its workdir has ``min_free_bytes`` free; while it
has not, it claims nothing and waits (says so once; a stop ends the wait). An attempt that
ended on a full disk is handed back rather than failed, within the limits of
:mod:`trainfleet.worker.disk`, and its directory is removed.

``max_mbps`` (``trainfleet join --max-mbps``) caps the worker's own uploads and downloads
(the client's token bucket) and is handed to replica programs, which pick their
pseudo-gradient codec from it. The global weights of collaborative runs are cached once per
worker (:class:`~trainfleet.worker.replica_task.WeightsCache`, under the data cache
directory); replica state directories live under ``WORKDIR/runs``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainfleet.capability.detect import detect_capability
from trainfleet.client import Client
from trainfleet.data.prepare import CacheSettings
from trainfleet.errors import (
    ApiError,
    Conflict,
    CoordinatorUnavailable,
    Unauthorized,
    UntrustedCertificate,
)
from trainfleet.worker.attempt import Attempt, Outcome
from trainfleet.worker.attest import Attester, enclave_from_spec
from trainfleet.worker.disk import MAX_DISK_HANDBACKS, ClaimGate, min_free_bytes_from_env
from trainfleet.worker.logship import LogLimits
from trainfleet.worker.replica_task import WeightsCache
from trainfleet.worker.report import Reply, Reporter, cut_text

log = logging.getLogger(__name__)

DEFAULT_KEEP_FAILED_ATTEMPTS = 5
OUTCOME_FILE = "outcome.txt"  # written in an attempt's directory when it ends
DEFAULT_CLAIM_WAIT_S = 20.0  # a long-poll claim's wait (the coordinator allows up to 30 s)
MIN_CLAIM_WAIT_S = 0.5  # shorter waits (near exit_when_idle_s) are plain claims


class ClaimInterrupted(BaseException):
    """Raised by the signal handler to cut a long-poll claim short (like KeyboardInterrupt,
    it is no Exception, so no retry loop swallows it)."""


@dataclass
class WorkerConfig:
    url: str
    join_token: str
    host: str | None = None
    workdir: Path = Path(".trainfleet-worker")
    poll_interval_s: float = 1.0  # the least pause between two claims that found nothing
    claim_wait_s: float = DEFAULT_CLAIM_WAIT_S  # long poll: wait this long for work (0: poll)
    num_threads: int | None = None  # default: the effective capability's cores
    max_jobs: int | None = None  # exit after this many attempts
    exit_when_idle_s: float | None = None  # exit after this long without work
    data: CacheSettings | None = None  # shard cache and routing checks; default under workdir
    keep_failed_attempts: int = DEFAULT_KEEP_FAILED_ATTEMPTS  # attempt dirs kept for debugging
    # claim only with this much free under workdir (env TRAINFLEET_MIN_FREE_BYTES; 1 MiB)
    min_free_bytes: int = field(default_factory=min_free_bytes_from_env)
    # the volunteer's link cap in Mbit/s (uploads, downloads; replica codecs): never the run's
    max_mbps: float | None = None
    # attest for the private tier with this enclave ("simulated:KEYFILE"; worker.attest)
    enclave: str | None = None


class Worker:
    def __init__(
        self, cfg: WorkerConfig, *, client_factory: Callable[[str | None], Client] | None = None
    ):
        self.cfg = cfg
        self.stop = threading.Event()
        self.reporter = Reporter(self.stop)
        self.outcomes: list[Outcome] = []  # one per attempt run, in order
        self._client_factory = client_factory or (
            lambda token: Client(cfg.url, token, max_mbps=cfg.max_mbps)
        )
        self.client = self._client_factory(cfg.join_token)
        self.worker_id: str | None = None
        self.registration: dict[str, Any] = {}
        self.disk_handbacks: dict[str, int] = {}  # job id -> full-disk hand-backs by this worker
        cache_dir = cfg.data.directory if cfg.data is not None else None
        self.weights = WeightsCache((cache_dir or cfg.workdir / "cache") / "weights")
        self.gate = ClaimGate(
            cfg.workdir, cfg.min_free_bytes, prune=lambda: prune_kept_attempts(cfg.workdir)
        )
        self._long_polling = False  # a long-poll claim is in flight (the signal handler cuts it)
        self.attester = Attester(enclave_from_spec(cfg.enclave)) if cfg.enclave else None

    # lifecycle --------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handle(signum: int, _frame: object) -> None:
            if self.stop.is_set():
                log.warning("second signal: exiting now")
                raise SystemExit(1)
            log.info(
                "%s received: stopping (the running job is handed back)",
                signal.Signals(signum).name,
            )
            self.stop.set()
            if self._long_polling:
                raise ClaimInterrupted

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def register(self) -> bool:
        """Register (retrying while unreachable); False when stopped first.

        A refused registration (a wrong join token) and a coordinator certificate that fails
        TLS verification (``UntrustedCertificate``) are raised: retrying cannot fix them.
        """
        cap = detect_capability(self.cfg.host)
        self.client.close()
        self.client = self._client_factory(self.cfg.join_token)
        answer = self.reporter.send(
            "register",
            lambda: self.client.register(cap.model_dump(mode="json")),
            fatal=(UntrustedCertificate,),
        )
        if answer.outcome == "unreachable":
            return False
        if answer.error is not None:
            raise answer.error
        reply: dict[str, Any] = answer.value or {}
        self.registration = reply
        self.worker_id = reply["worker_id"]
        self.client.close()
        self.client = self._client_factory(reply["token"])
        eff = reply["effective"]
        log.info(
            "registered as %s: host %s, %d cores, %.1f GiB RAM, %s",
            self.worker_id,
            eff["host"],
            eff["cores"],
            eff["ram_gib"],
            f"{eff['num_gpus']} GPU(s), {eff['vram_gib']:g} GiB" if eff["cuda"] else "no CUDA",
        )
        for note in reply["notes"]:
            log.warning("host policy: %s", note)
        if self.attester is not None:  # a new worker id starts unattested
            self.attester.reset()
            self.attester.attest(self.client)
        return True

    def run(self) -> list[Outcome]:
        """Serve until stopped, out of jobs (max_jobs) or idle too long (exit_when_idle_s)."""
        if not self.register():
            return self.outcomes
        idle_since = time.monotonic()
        while not self.stop.is_set():
            if self.cfg.max_jobs is not None and len(self.outcomes) >= self.cfg.max_jobs:
                break
            if not self.gate.has_room():  # a full disk: claim nothing until there is space
                if self._idle_too_long(idle_since):
                    break
                self.stop.wait(self.cfg.poll_interval_s)
                continue
            if self.attester is not None and self.attester.due():
                self.attester.attest(self.client)  # a refusal leaves public work claimable
            started = time.monotonic()
            answer = self._claim(self._claim_wait_s(idle_since))
            if answer is None or answer.outcome == "unreachable":
                break  # only when stopped
            if answer.error is not None:
                if isinstance(answer.error, Unauthorized):
                    log.warning("coordinator no longer knows this worker; registering again")
                    if not self.register():
                        break
                elif isinstance(answer.error, Conflict) and "job_id" in answer.error.details:
                    self._settle_held_job(answer.error.details)
                else:
                    self.stop.wait(self.cfg.poll_interval_s)
                continue
            claim = answer.value
            if self.stop.is_set():
                if claim is not None:  # stopped while the claim was in flight: hand it back
                    self._hand_back(claim)
                break
            if claim is None:
                if self._idle_too_long(idle_since):
                    break
                # An answer sooner than the poll interval (no long poll asked, or a coordinator
                # that does not long-poll) waits out the rest: never a busy loop.
                self.stop.wait(max(0.0, self.cfg.poll_interval_s - (time.monotonic() - started)))
                continue
            self.outcomes.append(self._run_attempt(claim))
            idle_since = time.monotonic()
        self._leave()
        return self.outcomes

    def _claim_wait_s(self, idle_since: float) -> float:
        """How long this claim may wait for work: ``claim_wait_s``, cut to what is left of
        ``exit_when_idle_s``; 0 (a plain claim) when that is under ``MIN_CLAIM_WAIT_S``."""
        wait_s = self.cfg.claim_wait_s
        if self.cfg.exit_when_idle_s is not None:
            wait_s = min(wait_s, self.cfg.exit_when_idle_s - (time.monotonic() - idle_since))
        return wait_s if wait_s >= MIN_CLAIM_WAIT_S else 0.0

    def _claim(self, wait_s: float) -> Reply[dict[str, Any] | None] | None:
        """One claim, a long poll when ``wait_s`` > 0; None when a stop cut it short."""
        if wait_s <= 0:
            return self.reporter.send("claim", self.client.claim)
        self._long_polling = True
        try:
            if self.stop.is_set():
                return None
            return self.reporter.send("claim", lambda: self.client.claim(wait_s=wait_s))
        except ClaimInterrupted:
            return None
        finally:
            self._long_polling = False

    def _idle_too_long(self, idle_since: float) -> bool:
        idle_s = time.monotonic() - idle_since
        if self.cfg.exit_when_idle_s is not None and idle_s >= self.cfg.exit_when_idle_s:
            log.info("no work for %.0fs: exiting", idle_s)
            return True
        return False

    def _hand_back(self, claim: dict[str, Any]) -> None:
        job_id, epoch = claim["job"]["id"], claim["epoch"]
        self.reporter.send(
            "hand-back",
            lambda: self.client.fail(job_id, epoch, "worker shutting down", release=True),
        )

    def _settle_held_job(self, held: dict[str, Any]) -> None:
        """Fail the job the coordinator says this worker still holds, so it can run again.

        This worker runs one attempt at a time and is between attempts: the held one is an
        attempt whose report never landed (or a claim whose reply was lost, then dropped).
        """
        job_id, epoch = str(held["job_id"]), int(held.get("epoch", 0))
        log.warning("coordinator says this worker still holds job %s: failing it", job_id[:12])
        reason = "the worker lost track of this attempt (its report never landed)"
        answer = self.reporter.send(
            "failure report of a held job",
            lambda: self.client.fail(job_id, epoch, reason, retryable=True),
        )
        if answer.outcome == "refused":
            self.stop.wait(self.cfg.poll_interval_s)  # do not spin on a coordinator that says no

    def _run_attempt(self, claim: dict[str, Any]) -> Outcome:
        threads = self.cfg.num_threads or int(self.registration["effective"]["cores"])
        timeout_s = self.registration.get("heartbeat_timeout_s")
        job_id = str(claim["job"]["id"])
        handbacks = self.disk_handbacks.get(job_id, 0)
        attempt = Attempt(
            self.client,
            claim,
            self.cfg.workdir,
            heartbeat_interval_s=float(self.registration["heartbeat_interval_s"]),
            num_threads=threads,
            stop=self.stop,
            data=self.cfg.data,
            lease_s=float(timeout_s) if timeout_s else None,
            limits=LogLimits.from_limits(self.registration.get("limits")),
            reporter=self.reporter,
            may_hand_back_disk=handbacks < MAX_DISK_HANDBACKS,
            max_mbps=self.cfg.max_mbps,
            weights=self.weights,
        )
        try:
            outcome = attempt.run()
            # The pace the coordinator last asked for (it grows with the fleet) holds for the
            # next attempt's first beats too.
            self.registration["heartbeat_interval_s"] = attempt.heartbeat_interval_s
            if attempt.lease_s is not None:
                self.registration["heartbeat_timeout_s"] = attempt.lease_s
        except Exception as err:  # a bug here must not take the whole worker down
            log.exception("attempt of %s crashed in the worker", claim["job"]["name"])
            error = cut_text(f"worker error: {err!r}", attempt.limits.max_error_chars)
            outcome = Outcome("failed", error)
            self.reporter.send(
                "failure report",
                lambda: self.client.fail(claim["job"]["id"], claim["epoch"], error),
                retry=False,
            )
        level = logging.INFO if outcome.status == "completed" else logging.WARNING
        log.log(level, "job %s %s: %s", claim["job"]["name"], outcome.status, outcome.detail)
        if outcome.disk_full:  # nothing worth keeping, and the space is needed
            if outcome.status == "released":
                self.disk_handbacks[job_id] = handbacks + 1
            shutil.rmtree(attempt.dir, ignore_errors=True)
        else:
            tidy_attempt_dirs(attempt.dir, outcome.status, self.cfg.keep_failed_attempts)
        return outcome

    def _leave(self) -> None:
        try:
            self.client.deregister()
            log.info("deregistered %s", self.worker_id)
        except (CoordinatorUnavailable, ApiError) as err:
            log.warning("could not deregister: %s", err)
        finally:
            self.client.close()


def tidy_attempt_dirs(attempt_dir: Path, status: str, keep_failed: int) -> None:
    """Remove a completed attempt's directory; keep only the newest ``keep_failed`` others.

    Tidying is best effort: it never fails the worker.
    """
    if status == "completed":
        shutil.rmtree(attempt_dir, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        (attempt_dir / OUTCOME_FILE).write_text(status + "\n")
    ended = []
    with contextlib.suppress(OSError):
        for d in attempt_dir.parent.iterdir():
            with contextlib.suppress(OSError):
                ended.append(((d / OUTCOME_FILE).stat().st_mtime, d))
    ended.sort()
    for _, d in ended[: max(0, len(ended) - keep_failed)]:
        shutil.rmtree(d, ignore_errors=True)


def prune_kept_attempts(workdir: Path) -> int:
    """Remove every attempt directory kept for debugging; how many were removed."""
    removed = 0
    with contextlib.suppress(OSError):
        for d in (workdir / "jobs").iterdir():
            if (d / OUTCOME_FILE).exists():
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
    return removed
