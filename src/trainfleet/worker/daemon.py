"""The worker daemon behind ``trainfleet join URL``.

Detect capability, register, then loop: claim, run the attempt, report. It reconnects with
exponential backoff (capped, jittered) whenever the coordinator is unreachable, and
re-registers if its credential is no longer known. On SIGTERM or SIGINT it stops claiming,
stops the running job and hands it back (no failure counted), deregisters and exits 0;
nothing is left claimed.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from trainfleet.capability.detect import detect_capability
from trainfleet.client import Client
from trainfleet.data.prepare import CacheSettings
from trainfleet.errors import ApiError, CoordinatorUnavailable, Unauthorized
from trainfleet.worker.attempt import Attempt, Outcome

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BACKOFF_S = 30.0


@dataclass
class WorkerConfig:
    url: str
    join_token: str
    host: str | None = None
    workdir: Path = Path(".trainfleet-worker")
    poll_interval_s: float = 1.0
    num_threads: int | None = None  # default: the effective capability's cores
    max_jobs: int | None = None  # exit after this many attempts
    exit_when_idle_s: float | None = None  # exit after this long without work
    data: CacheSettings | None = None  # shard cache and routing checks; default under workdir


class Worker:
    def __init__(
        self, cfg: WorkerConfig, *, client_factory: Callable[[str | None], Client] | None = None
    ):
        self.cfg = cfg
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []  # one per attempt run, in order
        self._client_factory = client_factory or (lambda token: Client(cfg.url, token))
        self.client = self._client_factory(cfg.join_token)
        self.worker_id: str | None = None
        self.registration: dict[str, Any] = {}

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

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _retrying(self, what: str, call: Callable[[], T]) -> T | None:
        """Call until it succeeds or the worker stops; back off while unreachable."""
        delay = 0.5
        while not self.stop.is_set():
            try:
                return call()
            except CoordinatorUnavailable as err:
                wait = min(delay, MAX_BACKOFF_S) * random.uniform(0.8, 1.2)
                log.warning("%s: coordinator unreachable (%s); retrying in %.1fs", what, err, wait)
                self.stop.wait(wait)
                delay *= 2
        return None

    def register(self) -> bool:
        cap = detect_capability(self.cfg.host)
        self.client.close()
        self.client = self._client_factory(self.cfg.join_token)
        reply = self._retrying(
            "register", lambda: self.client.register(cap.model_dump(mode="json"))
        )
        if reply is None:
            return False
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
        return True

    def run(self) -> list[Outcome]:
        """Serve until stopped, out of jobs (max_jobs) or idle too long (exit_when_idle_s)."""
        if not self.register():
            return self.outcomes
        idle_since = time.monotonic()
        while not self.stop.is_set():
            if self.cfg.max_jobs is not None and len(self.outcomes) >= self.cfg.max_jobs:
                break
            try:
                claim = self._retrying("claim", self.client.claim)
            except Unauthorized:
                log.warning("coordinator no longer knows this worker; registering again")
                if not self.register():
                    break
                continue
            if self.stop.is_set():
                break
            if claim is None:
                idle_s = time.monotonic() - idle_since
                if self.cfg.exit_when_idle_s is not None and idle_s >= self.cfg.exit_when_idle_s:
                    log.info("no work for %.0fs: exiting", idle_s)
                    break
                self.stop.wait(self.cfg.poll_interval_s)
                continue
            self.outcomes.append(self._run_attempt(claim))
            idle_since = time.monotonic()
        self._leave()
        return self.outcomes

    def _run_attempt(self, claim: dict[str, Any]) -> Outcome:
        threads = self.cfg.num_threads or int(self.registration["effective"]["cores"])
        attempt = Attempt(
            self.client,
            claim,
            self.cfg.workdir,
            heartbeat_interval_s=float(self.registration["heartbeat_interval_s"]),
            num_threads=threads,
            stop=self.stop,
            data=self.cfg.data,
        )
        try:
            outcome = attempt.run()
        except Exception as err:  # a bug here must not take the whole worker down
            log.exception("attempt of %s crashed in the worker", claim["job"]["name"])
            outcome = Outcome("failed", f"worker error: {err!r}")
            try:
                self.client.fail(claim["job"]["id"], claim["epoch"], f"worker error: {err!r}")
            except (ApiError, CoordinatorUnavailable) as report_err:
                log.warning("could not report the failure: %s", report_err)
        level = logging.INFO if outcome.status == "completed" else logging.WARNING
        log.log(level, "job %s %s: %s", claim["job"]["name"], outcome.status, outcome.detail)
        return outcome

    def _leave(self) -> None:
        try:
            self.client.deregister()
            log.info("deregistered %s", self.worker_id)
        except (CoordinatorUnavailable, Unauthorized) as err:
            log.warning("could not deregister: %s", err)
        finally:
            self.client.close()
