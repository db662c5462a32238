"""The shepherd: a tiny process between the worker daemon and a job, so jobs die with both.

``python -m trainfleet.worker.shepherd [--grace-s S] [--pgid-file F] -- ARGV...``

- starts ARGV in a new process group (and writes that group's id to ``--pgid-file``);
- asks Linux to signal it when its parent (the daemon) dies (``prctl(PR_SET_PDEATHSIG)``),
  and also polls ``os.getppid()`` as a fallback where there is no prctl: either way the job's
  whole group is killed, so a daemon killed by ``kill -9`` or the OOM killer leaves no copy
  of the attempt running while the coordinator hands it to another worker;
- on SIGTERM/SIGINT it passes SIGTERM to the group and SIGKILLs it after ``--grace-s``;
- when the job's main process exits it SIGKILLs whatever the job left behind in its group
  (``sleep 1000 &``), so nothing holds the output pipe, and exits with the job's status;
- it is a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``): a descendant that left the
  job's group (``setsid``, a double fork) is re-parented to the shepherd instead of init, so
  it is still found, and killed, among the shepherd's descendants whenever the group is.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PARENT_DEATH_SIGNAL = signal.SIGUSR1
POLL_S = 0.2


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)`` (Linux only); False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` when our parent thread dies (Linux only)."""
    return _prctl(PR_SET_PDEATHSIG, int(sig))


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_all(pgid: int) -> None:
    """SIGKILL the job's process group and every other descendant of this shepherd.

    The second part catches what left the group (``setsid``, a double fork): as a child
    subreaper the shepherd is the ancestor of all of it, orphans included.
    """
    kill_group(pgid, signal.SIGKILL)
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def exit_status(returncode: int) -> int:
    """A shell-style exit status: 128 + N for a job killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainfleet.worker.shepherd")
    parser.add_argument("--grace-s", type=float, default=10.0)
    parser.add_argument("--pgid-file", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")

    parent = os.getppid()
    set_parent_death_signal(PARENT_DEATH_SIGNAL)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    state: dict[str, float | None] = {"kill_at": None}
    job: subprocess.Popen[bytes] | None = None

    def on_parent_death(_signum: int, _frame: FrameType | None) -> None:
        if job is not None:
            kill_all(job.pid)
        os._exit(137)

    def on_stop(_signum: int, _frame: FrameType | None) -> None:
        if job is not None:
            kill_group(job.pid, signal.SIGTERM)
        if state["kill_at"] is None:
            state["kill_at"] = time.monotonic() + args.grace_s

    signal.signal(PARENT_DEATH_SIGNAL, on_parent_death)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if os.getppid() != parent:  # the daemon died before prctl took effect
        return 137
    try:
        job = subprocess.Popen(command, start_new_session=True)
    except OSError as err:
        print(f"[trainfleet] cannot start {command[0]!r}: {err}", flush=True)
        return 127
    if args.pgid_file is not None:
        with contextlib.suppress(OSError):  # a full disk: the daemon falls back on us
            args.pgid_file.write_text(str(job.pid))
    if state["kill_at"] is not None:  # a stop arrived before the job started
        kill_group(job.pid, signal.SIGTERM)
    while True:
        try:
            returncode = job.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:
            kill_all(job.pid)
            return 137
        kill_at = state["kill_at"]
        if kill_at is not None and time.monotonic() > kill_at:
            kill_all(job.pid)
    kill_all(job.pid)  # whatever the job left running in its group
    return exit_status(returncode)


if __name__ == "__main__":
    sys.exit(main())
