"""A handle on one real ``trainfleet join`` process started by a :class:`LiveFleet`.

The daemon runs in its own session; its jobs run in sessions of their own (the worker starts
them so). Every process the harness starts carries ``TRAINFLEET_HARNESS_TAG`` in its
environment, and jobs inherit it, so the handle finds this worker's job processes even after
the daemon died and they were re-parented to init, and teardown can kill every stray.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import psutil

from trainfleet import env
from trainfleet.testing.disk import SmallDisk
from trainfleet.testing.proxy import FaultProxy

__all__ = ["WorkerHandle", "kill_tree", "tagged_processes"]


class WorkerHandle:
    """One worker daemon (``proc``), its link (``proxy``) and, optionally, its own disk."""

    def __init__(
        self,
        host: str,
        proc: subprocess.Popen[str],
        *,
        tag: str,
        log_path: Path,
        log_file: IO[str],
        workdir: Path,
        proxy: FaultProxy | None,
        disk: SmallDisk | None,
    ) -> None:
        self.host = host
        self.proc = proc
        self.tag = tag
        self.log_path = log_path
        self.workdir = workdir
        self.proxy = proxy
        self.disk = disk
        self._log_file = log_file

    # -- Popen-compatible surface (the older tests treat a worker as a Popen) ------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    # -- faults -------------------------------------------------------------------------
    def kill_daemon(self) -> None:
        """SIGKILL the worker daemon alone (its jobs are left to fend for themselves)."""
        self.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def kill_job(self) -> list[int]:
        """SIGKILL the process group of each running job of this worker, and nothing else.

        Returns the process group ids killed (empty if no job was running)."""
        daemon_pgid = _pgid(self.proc.pid)
        groups = {_pgid(pid) for pid in self.job_pids()} - {None, daemon_pgid}
        for pgid in groups:
            assert pgid is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        return sorted(g for g in groups if g is not None)

    def sigterm(self) -> None:
        """Ask the daemon to stop gracefully (it hands its job back)."""
        self.send_signal(signal.SIGTERM)

    def sigterm_during(
        self,
        method: str = "POST",
        path_regex: str = r"/claim$",
        *,
        hold_s: float = 1.0,
        timeout_s: float = 30.0,
    ) -> None:
        """SIGTERM the daemon while its next matching request (default: a claim) is in
        flight: the proxy holds it ``hold_s``, the signal lands meanwhile, then the request
        goes on to the coordinator (which commits it) and the reply back to a stopping
        worker. ``AssertionError`` if no such request came within ``timeout_s``."""
        if self.proxy is None:
            raise RuntimeError(f"worker {self.host} was started with proxy=False")
        held = len(self.proxy.arrived(method, path_regex, fault="delayed"))
        self.proxy.delay(method, path_regex, seconds=hold_s, times=1)
        try:
            self.proxy.wait_arrival(method, path_regex, timeout_s, count=held + 1, fault="delayed")
        except AssertionError:
            self.proxy.clear()
            raise
        self.sigterm()

    def fill_disk(self) -> int:
        """Fill the worker's workdir filesystem (ENOSPC from now on); bytes written."""
        if self.disk is None:
            raise RuntimeError(f"worker {self.host} was started without disk_mib=")
        return self.disk.fill()

    def free_disk(self) -> None:
        if self.disk is not None:
            self.disk.free()

    # -- observation --------------------------------------------------------------------
    def job_pids(self) -> list[int]:
        """Pids of this worker's job processes (live ones, even orphaned ones)."""
        return sorted(
            p.pid for p in tagged_processes(self.tag) if p.pid != self.proc.pid and _is_job(p)
        )

    def job_names(self) -> list[str]:
        """Names of the jobs this worker's live job processes run (``TRAINFLEET_JOB_NAME``)."""
        names = set()
        for p in tagged_processes(self.tag):
            with contextlib.suppress(psutil.Error):
                if p.pid != self.proc.pid and (name := p.environ().get(env.JOB_NAME)):
                    names.add(name)
        return sorted(names)

    def log_text(self) -> str:
        """The daemon's combined stdout/stderr so far."""
        self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    # -- teardown -----------------------------------------------------------------------
    def destroy(self) -> None:
        """Kill the daemon and every process carrying this worker's tag; release the disk."""
        kill_tree(self.proc)
        for p in tagged_processes(self.tag):
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        # Orphans are not our children to reap: wait until each is gone or a zombie.
        deadline = time.monotonic() + 10
        while tagged_processes(self.tag) and time.monotonic() < deadline:
            threading.Event().wait(0.05)
        if self.proxy is not None:
            self.proxy.close()
        if self.disk is not None:
            self.disk.unmount()
        self._log_file.close()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _is_job(p: psutil.Process) -> bool:
    try:
        shepherd = "trainfleet.worker.shepherd" in p.cmdline()  # between daemon and job
        return env.JOB_ID in p.environ() and not shepherd and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose ``TRAINFLEET_HARNESS_TAG`` is ``tag`` or ``tag/...``."""
    found = []
    for p in psutil.process_iter():
        try:
            value = p.environ().get(env.HARNESS_TAG, "")
            mine = value == tag or value.startswith(tag + "/")
            if mine and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def kill_tree(proc: subprocess.Popen[str] | WorkerHandle, sig: int = signal.SIGKILL) -> None:
    """Signal a process and every process it started (jobs run in their own sessions)."""
    try:
        root = psutil.Process(proc.pid)
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        root, children = None, []
    targets = [root, *children] if root is not None and proc.poll() is None else children
    for p in targets:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
