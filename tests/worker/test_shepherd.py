"""The shepherd: the job runs in its own group, which dies with the job's main process and
with the shepherd's parent (kill -9 of the worker daemon)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from trainfleet.worker.shepherd import exit_status


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    pause = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return True
        pause.wait(0.05)
    return bool(predicate())


def shepherd(*argv: str, pgid_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainfleet.worker.shepherd",
        "--grace-s",
        "1",
        "--pgid-file",
        str(pgid_file),
        "--",
        *argv,
    ]


def test_exit_status_is_passed_through_and_leftovers_are_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '1000'], stdout=subprocess.DEVNULL)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "sys.exit(7)\n"
    )
    done = subprocess.run(
        shepherd(sys.executable, "-c", code, pgid_file=tmp_path / "pgid"), timeout=60
    )
    assert done.returncode == 7
    assert wait_for(lambda: gone(int(pid_file.read_text())))
    assert exit_status(-9) == 137


def test_the_job_group_dies_when_the_shepherds_parent_is_killed(tmp_path: Path) -> None:
    pgid_file = tmp_path / "pgid"
    # A stand-in for the daemon: starts the shepherd, then waits forever.
    parent_code = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen({shepherd('sleep', '1000', pgid_file=pgid_file)!r})\n"
        "time.sleep(1000)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], start_new_session=True)
    try:
        assert wait_for(lambda: pgid_file.exists() and pgid_file.read_text() != "", 30)
        job = int(pgid_file.read_text())
        assert os.getpgid(job) == job  # the job leads its own process group
        parent.send_signal(signal.SIGKILL)  # kill -9 of the daemon
        parent.wait(timeout=10)
        assert wait_for(lambda: gone(job), 10), "the job outlived the daemon"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_sigterm_is_passed_to_the_group_then_sigkill_after_the_grace(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(ready)!r}, 'w').write('1')\n"
        "time.sleep(1000)\n"
    )
    proc = subprocess.Popen(shepherd(sys.executable, "-c", code, pgid_file=tmp_path / "pgid"))
    assert wait_for(lambda: ready.exists(), 30)
    job = int((tmp_path / "pgid").read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 128 + signal.SIGKILL  # ignored SIGTERM, killed after 1 s
    assert wait_for(lambda: gone(job))


def test_a_descendant_that_left_the_group_is_killed_too(tmp_path: Path) -> None:
    """``setsid`` plus a double fork leaves the job's group and its parent: the shepherd,
    a child subreaper, still finds it among its descendants and kills it."""
    pid_file = tmp_path / "escaped.pid"
    # The job starts a middle process, which starts `sleep` in a new session and exits at
    # once, so `sleep` is an orphan outside the job's group; then the job exits 0.
    middle = (
        "import subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '1000'], start_new_session=True,"
        " stdout=subprocess.DEVNULL)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
    )
    job = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {middle!r}])\n"
    done = subprocess.run(
        shepherd(sys.executable, "-c", job, pgid_file=tmp_path / "pgid"), timeout=60
    )
    assert done.returncode == 0
    escaped = int(pid_file.read_text())
    try:
        assert wait_for(lambda: gone(escaped)), "a setsid'd orphan outlived its attempt"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(escaped, signal.SIGKILL)
