"""A job's processes, as the worker sees them: started under a shepherd, read, and stopped.

The job runs under :mod:`trainfleet.worker.shepherd`, which puts it in its own process group,
kills that group when the daemon dies, and kills what the job leaves behind when it exits.
The daemon reads the job's output from a pipe, one line at a time, each line cut to a bound
while it is read (a job that prints a gigabyte on one line costs no memory); every byte still
goes to the attempt's local ``output.log``. Reading never holds up the report: once the
shepherd has exited, the reader gets a short grace to drain the pipe, and is abandoned.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from trainfleet.worker.shepherd import kill_group

log = logging.getLogger(__name__)

READ_LINE_BYTES = 16 * 1024  # a longer line is cut: the coordinator keeps 4,096 characters
DRAIN_S = 2.0  # how long the output of an exited job may still be read


class DiskFull(OSError):
    """The worker's disk is full (ENOSPC or a quota) while running an attempt."""


def is_disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


class JobProcess:
    """One job's process group, started under the shepherd.

    Start it from a thread that lives as long as the daemon (the daemon's main thread):
    the kernel's parent-death signal fires when the parent *thread* exits.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        log_path: Path,
        on_line: Callable[[str], None],
        grace_s: float,
    ):
        self.grace_s = grace_s
        self.log_path = log_path
        self.on_line = on_line
        self.disk_error: OSError | None = None  # set when output.log could not be written
        pgid_file = log_path.parent / "job.pgid"
        self._pgid_file = pgid_file
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainfleet.worker.shepherd",
                "--grace-s",
                str(grace_s),
                "--pgid-file",
                str(pgid_file),
                "--",
                *argv,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="job-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def job_pgid(self) -> int | None:
        """The job's process group id, once the shepherd has started it."""
        try:
            return int(self._pgid_file.read_text())
        except (OSError, ValueError):
            return None

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        """Ask the job to stop: SIGTERM now, SIGKILL after the grace (the shepherd does it)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the job's whole group and the shepherd at once."""
        pgid = self.job_pgid()
        if pgid is not None:
            kill_group(pgid, signal.SIGKILL)
        kill_group(self.proc.pid, signal.SIGKILL)

    def stop(self) -> int:
        """Stop the job (gracefully, then by force) and wait for it; returns its exit status."""
        if self.proc.poll() is None:
            self.terminate()
            if self.wait(self.grace_s + 5.0) is None:
                log.warning("job did not stop within %.0fs: killing its group", self.grace_s)
                self.kill()
        return self.finish()

    def finish(self) -> int:
        """After the shepherd exited: make sure the group is gone, drain the output a little."""
        returncode = self.proc.wait()
        pgid = self.job_pgid()
        if pgid is not None:  # normally done by the shepherd; not if it was killed
            kill_group(pgid, signal.SIGKILL)
        self._reader.join(timeout=DRAIN_S)
        assert self.proc.stdout is not None
        if self._reader.is_alive():
            # A process that left the job's group holds the pipe: stop reading (the reader
            # thread is a daemon, blocked on a pipe nobody waits for).
            log.warning("job output still open after the job exited; no longer read")
        else:
            self.proc.stdout.close()
        return returncode

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            local: IO[bytes] | None = self.log_path.open("ab", buffering=0)
        except OSError as err:
            self.disk_error, local = err, None
        try:
            _copy_lines(self.proc.stdout, local, self.on_line, self._on_write_error)
        except (OSError, ValueError):  # the pipe was closed under us by finish()
            pass
        finally:
            if local is not None:
                with contextlib.suppress(OSError):
                    local.close()

    def _on_write_error(self, err: OSError) -> None:
        if self.disk_error is None:
            self.disk_error = err


def _copy_lines(
    pipe: IO[bytes],
    local: IO[bytes] | None,
    on_line: Callable[[str], None],
    on_write_error: Callable[[OSError], None],
) -> None:
    """Copy ``pipe`` to ``local`` whole, and hand each line, cut to a bound, to ``on_line``."""
    head = b""  # the kept start of the current line
    cut_bytes = 0  # bytes of the current line past the bound
    while chunk := pipe.readline(READ_LINE_BYTES):
        if local is not None:
            try:
                local.write(chunk)
            except OSError as err:
                on_write_error(err)
                with contextlib.suppress(OSError):
                    local.close()
                local = None
        ended = chunk.endswith(b"\n")
        body = chunk[:-1] if ended else chunk
        room = READ_LINE_BYTES - len(head)
        head, cut_bytes = head + body[:room], cut_bytes + max(0, len(body) - room)
        if ended:
            _emit(head, cut_bytes, on_line)
            head, cut_bytes = b"", 0
    if head or cut_bytes:
        _emit(head, cut_bytes, on_line)


def _emit(head: bytes, cut_bytes: int, on_line: Callable[[str], None]) -> None:
    text = head.decode(errors="replace").rstrip("\r")
    if cut_bytes:
        text += f"… [{cut_bytes} bytes cut]"
    on_line(text)


def ensure_dir(path: Path) -> None:
    """``mkdir -p``, with a full disk raised as ``DiskFull``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if is_disk_full(err):
            raise DiskFull(err.errno, f"disk full on worker: cannot create {path}: {err}") from err
        raise


__all__ = ["DiskFull", "JobProcess", "ensure_dir", "is_disk_full"]
