"""Run one claimed attempt: a subprocess, its heartbeats and logs, then upload and complete.

The job always runs in its own process (built-in ``train`` jobs too), in its own session so
the whole process group can be stopped. A background thread heartbeats every interval; the
reply may say the job was cancelled, and a 409 says our claim was written off (fenced): in
both cases the process is stopped and nothing more is reported for this attempt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from trainfleet import env
from trainfleet.artifacts import pack_dir
from trainfleet.client import Client
from trainfleet.data.prepare import CacheSettings
from trainfleet.data.spec import DatasetSpec
from trainfleet.data.verify import router_fit_id
from trainfleet.errors import ApiError, Conflict, CoordinatorUnavailable

log = logging.getLogger(__name__)

TERM_GRACE_S = 10.0
USAGE_ERROR_EXIT = 2  # a built-in trainer exiting 2 rejected its parameters: never retried
REFUSED_EXIT = 3  # a built-in trainer exiting 3 refused its data (a wrong router): never retried
NOT_RETRIED_EXITS = (USAGE_ERROR_EXIT, REFUSED_EXIT)
MAX_UNSENT_LINES = 10_000  # log lines kept while the coordinator is unreachable
REPORT_PATIENCE_S = 3600.0  # how long a finished attempt keeps trying to report


def build_argv(spec: dict[str, Any], output_dir: Path) -> list[str]:
    """The job's command line: the built-in trainer, or the manifest's command + --key value."""
    if spec["kind"] == "train":
        return [
            sys.executable,
            "-u",
            "-m",
            "trainfleet.train",
            "--params",
            json.dumps(spec["hyper"]),
            "--mode",
            spec["mode"],
            "--output",
            str(output_dir),
            *_data_args(spec),
        ]
    argv = list(spec["command"])
    for key, value in spec["hyper"].items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        argv += [f"--{key}", text]
    return argv


def _data_args(spec: dict[str, Any]) -> list[str]:
    if spec.get("dataset") is None:
        return []
    args = ["--dataset", json.dumps(spec["dataset"])]
    return args + (["--path", str(spec["path"])] if spec.get("path") is not None else [])


def build_env(
    claim: dict[str, Any],
    output_dir: Path,
    num_threads: int,
    data_env: dict[str, str] | None = None,
) -> dict[str, str]:
    job = claim["job"]
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(num_threads),
        env.NUM_THREADS: str(num_threads),
        env.JOB_ID: job["id"],
        env.JOB_NAME: job["name"],
        env.ATTEMPT: str(claim["attempt"]),
        env.MODE: job["spec"]["mode"],
        env.OUTPUT_DIR: str(output_dir),
        **(data_env or {}),
    }


@dataclass
class Outcome:
    """How an attempt ended, from this worker's point of view."""

    status: str  # completed | failed | cancelled | fenced | released
    detail: str = ""
    result: dict[str, Any] = field(default_factory=dict)


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
    ):
        self.client = client
        self.claim = claim
        self.job = claim["job"]
        self.job_id: str = self.job["id"]
        self.epoch: int = claim["epoch"]
        self.spec = self.job["spec"]
        self.dir = workdir / "jobs" / f"{self.job_id[:12]}-a{claim['attempt']}"
        self.output_dir = self.dir / "output"
        self.heartbeat_interval_s = heartbeat_interval_s
        self.num_threads = num_threads
        self.data = data or CacheSettings(directory=workdir / "cache")
        self.data_env = self.data.to_env()
        self.stop = stop  # set by the daemon on SIGTERM: hand the job back
        self.cancelled = threading.Event()
        self.fenced = threading.Event()
        self._done = threading.Event()
        self._pending_lines: list[str] = []
        self._lines_lock = threading.Lock()
        self._tail: deque[str] = deque(maxlen=20)

    # background threads -----------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._done.is_set():
            try:
                reply = self.client.heartbeat(self.job_id, self.epoch)
                if reply["cancel"]:
                    log.warning("job %s was cancelled by the operator", self.job["name"])
                    self.cancelled.set()
                    return
            except Conflict as err:
                log.warning("job %s: claim written off (%s)", self.job["name"], err.message)
                self.fenced.set()
                return
            except CoordinatorUnavailable as err:
                log.warning("heartbeat failed, will retry: %s", err)
            self._done.wait(self.heartbeat_interval_s)

    def _ship_logs_loop(self) -> None:
        while True:
            finished = self._done.wait(0.5)
            self._flush_logs()
            if finished:
                return

    def _flush_logs(self) -> None:
        with self._lines_lock:
            lines, self._pending_lines = self._pending_lines, []
        if not lines or self.fenced.is_set() or self.cancelled.is_set():
            return
        try:
            self.client.append_log(self.job_id, self.epoch, lines)
        except Conflict:
            self.fenced.set()
        except CoordinatorUnavailable:
            with self._lines_lock:  # keep them for the next flush, within a bound
                self._pending_lines = (lines + self._pending_lines)[-MAX_UNSENT_LINES:]
        except ApiError as err:
            log.warning("coordinator refused %d log lines: %s", len(lines), err)

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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._fetch_router()
        argv = build_argv(self.spec, self.output_dir)
        log.info(
            "running %s (attempt %d, epoch %d): %s",
            self.job["name"],
            self.claim["attempt"],
            self.epoch,
            " ".join(argv[:6]),
        )
        threads = [
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
            threading.Thread(target=self._ship_logs_loop, name="logs", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            returncode, stopped_by = self._run_process(argv)
            # Heartbeats go on until the report lands: a result waiting out a coordinator
            # outage keeps its lease the moment the coordinator is back.
            return self._report(returncode, stopped_by)
        finally:
            self._done.set()
            for t in threads:
                t.join(timeout=30)

    def _run_process(self, argv: list[str]) -> tuple[int | None, str | None]:
        try:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=build_env(self.claim, self.output_dir, self.num_threads, self.data_env),
                start_new_session=True,
                text=True,
                errors="replace",
                bufsize=1,
            )
        except OSError as err:
            self._add_line(f"[trainfleet] cannot start {argv[0]!r}: {err}")
            return None, None
        reader = threading.Thread(target=self._read_output, args=(proc,), daemon=True)
        reader.start()
        deadline = time.monotonic() + float(self.spec["timeout_s"])
        stopped_by = None
        while proc.poll() is None:
            if self.cancelled.is_set():
                stopped_by = "cancelled"
            elif self.fenced.is_set():
                stopped_by = "fenced"
            elif self.stop.is_set():
                stopped_by = "released"
            elif time.monotonic() > deadline:
                stopped_by = "timeout"
            if stopped_by:
                _terminate(proc)
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
        proc.wait()
        reader.join(timeout=10)
        return proc.returncode, stopped_by

    def _read_output(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with (self.dir / "output.log").open("w") as local:
            for line in proc.stdout:
                local.write(line)
                self._add_line(line.rstrip("\n"))

    def _add_line(self, line: str) -> None:
        self._tail.append(line)
        with self._lines_lock:
            self._pending_lines.append(line)

    def _report(self, returncode: int | None, stopped_by: str | None) -> Outcome:
        """Tell the coordinator how the attempt ended (unless it no longer wants to know)."""
        self._flush_logs()
        name = self.job["name"]
        if stopped_by in ("cancelled", "fenced"):
            return Outcome(stopped_by, f"{name}: stopped, nothing reported")
        if stopped_by == "released":
            self._send(
                lambda: self.client.fail(
                    self.job_id, self.epoch, "worker shutting down: job handed back", release=True
                )
            )
            return Outcome("released", f"{name}: handed back")
        if stopped_by == "timeout":
            error = f"timed out after {self.spec['timeout_s']:g}s"
            self._send(lambda: self.client.fail(self.job_id, self.epoch, error))
            return Outcome("failed", error)
        if returncode != 0:
            tail = "\n".join(list(self._tail)[-5:])
            error = f"exit code {returncode}" + (f"; last output:\n{tail}" if tail else "")
            retryable = not (self.spec["kind"] == "train" and returncode in NOT_RETRIED_EXITS)
            self._send(
                lambda: self.client.fail(self.job_id, self.epoch, error, retryable=retryable)
            )
            return Outcome("failed", error)
        return self._upload_and_complete()

    def _upload_and_complete(self) -> Outcome:
        archive = self.dir / "outputs.tar.zst"
        sha256, size = pack_dir(self.output_dir, archive)
        metrics_path = self.output_dir / "metrics.json"
        metrics: dict[str, Any] = {}
        if metrics_path.exists():
            try:
                metrics = json.loads(metrics_path.read_text())
            except ValueError as err:
                log.warning("metrics.json is not valid JSON (%s); reporting no metrics", err)
        result = {"metrics": metrics, "artifact": sha256, "artifact_size": size}
        ok = self._send(
            lambda: self.client.upload(self.job_id, self.epoch, archive, sha256, archive.name)
        ) and self._send(lambda: self.client.complete(self.job_id, self.epoch, result))
        if not ok:
            return Outcome("fenced", "coordinator refused the result")
        return Outcome("completed", f"artifact {sha256[:12]} ({size} bytes)", result)

    def _send(self, call: Any) -> bool:
        """Make a reporting call, retrying while the coordinator is unreachable.

        A finished attempt's result is worth waiting for: the coordinator renews every lease
        when it comes back, so the claim is still ours unless it says otherwise (409). We
        give up after ``REPORT_PATIENCE_S``, or after a few tries once asked to shut down.
        """
        delay, deadline, tries_after_stop = 0.5, time.monotonic() + REPORT_PATIENCE_S, 3
        while True:
            try:
                call()
                return True
            except ApiError as err:
                log.warning("coordinator refused report for %s: %s", self.job["name"], err.message)
                return False
            except CoordinatorUnavailable as err:
                if self.stop.is_set():
                    tries_after_stop -= 1
                if time.monotonic() > deadline or tries_after_stop <= 0:
                    log.error("giving up reporting %s: %s", self.job["name"], err)
                    return False
                log.warning("report failed (%s); retrying in %.1fs", err, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)


def _terminate(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the job's process group, then SIGKILL it after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
