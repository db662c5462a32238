"""The servers bench.queue measures, as live subprocesses: ``trainfleet serve`` (one or more,
on one database) and the reference server, plus a fresh PostgreSQL database per arm.

Each server's CPU is read with psutil on its pid, so the figure is the server's own work,
separate from the load generator's on the same machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.common import ROOT
from bench.queue_profile import PROFILE_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 300.0
) -> None:
    """Wait until GET /health answers 200 (or the process died, or ``timeout_s`` passed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"server exited with {proc.returncode} before it was healthy:\n{tail}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # polling a state with a deadline, not a fixed wait
    raise RuntimeError(f"server on port {port} not healthy after {timeout_s:.0f}s")


@dataclass
class Servers:
    """Running server processes, their ports, and the operator token they share."""

    procs: list[subprocess.Popen[bytes]]
    ports: list[int]
    operator_token: str
    db: str  # what the invariant checker reads: a SQLite path or a postgresql:// URL
    logs: list[Path] = field(default_factory=list)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) all server processes have used so far."""
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(p.pid).cpu_times()
                total += t.user + t.system
        return total

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _db_flag() -> str:
    """``serve``'s database option: ``--db`` (issue 9) or ``--queue-url`` (before it)."""
    out = subprocess.run(
        [sys.executable, "-m", "trainfleet.cli.main", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    return "--db" if "--db" in out else "--queue-url"


@contextlib.contextmanager
def trainfleet_servers(
    state: Path, manifest: Path, db_url: str | None = None, count: int = 1
) -> Iterator[Servers]:
    """``count`` live ``trainfleet serve`` processes on one database (SQLite in ``state`` when
    ``db_url`` is None). The first loads ``manifest``; the others start once it is up."""
    state.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    token_file = state / "operator.token.shared"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    db = db_url or str(state / "c0" / "queue.db")
    flag = _db_flag()
    servers = Servers([], [], token, db)
    try:
        for i in range(count):
            port = free_port()
            cmd = [sys.executable, "-m", "trainfleet.cli.main", "serve"]
            profile = os.environ.get(PROFILE_ENV)
            if profile:  # cProfile of the event loop and the writer (bench.queue_profile)
                cmd[2:3] = ["bench.queue_profile", profile]
            cmd += [str(manifest)] if i == 0 else []
            cmd += ["--port", str(port), "--state-dir", str(state / f"c{i}")]
            cmd += ["--operator-token-file", str(token_file), "--log-level", "warning"]
            if db_url:
                cmd += [flag, db_url]
            log = state / f"c{i}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            servers.procs.append(proc)
            servers.ports.append(port)
            servers.logs.append(log)
            wait_healthy(port, proc, log)
        yield servers
    finally:
        servers.stop()


@contextlib.contextmanager
def reference_server(state: Path, manifest: Path) -> Iterator[Servers]:
    """The minimal reference server (``bench.queue_ref``) on a fresh SQLite file."""
    state.mkdir(parents=True, exist_ok=True)
    token, port, db = secrets.token_urlsafe(24), free_port(), state / "ref.db"
    cmd = [sys.executable, "-m", "bench.queue_ref", "--db", str(db), "--manifest", str(manifest)]
    cmd += ["--port", str(port), f"--operator-token={token}"]  # a token may start with "-"
    log = state / "ref.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    servers = Servers([proc], [port], token, str(db), [log])
    try:
        wait_healthy(port, proc, log)
        yield servers
    finally:
        servers.stop()


@contextlib.contextmanager
def fresh_postgres(base_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``base_url``, dropped afterwards."""
    import psycopg

    name = f"tfbench_{secrets.token_hex(4)}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = base_url.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def postgres_reachable(url: str) -> str | None:
    """None if ``url`` accepts connections, else why not."""
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3):
            return None
    except Exception as err:
        return f"{type(err).__name__}: {err}"
