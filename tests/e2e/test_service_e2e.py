"""End to end, the worker as a service: ``trainfleet join ... --install-service`` through the
real CLI, then the installed unit started as systemd starts it, against a live coordinator.

This machine (like CI's) runs no systemd, so a recording ``systemctl`` stands in for the
calls the install makes, and the test itself plays systemd's part for the one thing that
matters: the unit it wrote must make a working worker. It runs the unit's ``ExecStart`` argv
with only the variables of its ``Environment=`` lines and its ``EnvironmentFile=`` (so the
token reaches the worker from the root-only file, not from the test), in its
``WorkingDirectory``. The worker joins as the enrolled host and runs a job; ``KillSignal``
sent to the main process alone (``KillMode=mixed``) stops it gracefully within
``TimeoutStopSec``, deregistered. ``--uninstall-service`` then stops, disables and removes both
files. Rendering every flag and the quoting rules are in ``tests/worker/test_service.py``.
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from livefleet import command_job
from trainfleet.testing import LiveFleet
from trainfleet.testing.fleet import trainfleet_argv
from trainfleet.testing.wait import wait_until

pytestmark = pytest.mark.slow

RECORDING_SYSTEMCTL = '#!/bin/sh\nprintf \'%s\\n\' "$*" >> "$SYSTEMCTL_LOG"\n'


def unit_settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def env_file_vars(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of an ``EnvironmentFile=`` (a double-quoted value unquoted)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = shlex.split(value)[0] if value.startswith('"') else value
    return out


def as_systemd_runs_it(unit: str) -> tuple[list[str], dict[str, str], str, float]:
    """The main process of the unit: argv, environment, working directory, stop timeout."""
    s = unit_settings(unit)
    (exec_start,) = s["ExecStart"]
    assert "%" not in exec_start and "$" not in exec_start, exec_start  # plain paths here
    environment = dict(e.partition("=")[::2] for e in s.get("Environment", []))
    for path in s["EnvironmentFile"]:
        environment.update(env_file_vars(Path(path).read_text()))
    (cwd,) = s["WorkingDirectory"]
    (stop,) = s["TimeoutStopSec"]
    return shlex.split(exec_start), environment, cwd, float(stop.removesuffix("s"))


def test_the_installed_unit_runs_a_worker_that_stops_gracefully(tmp_path: Path) -> None:
    with LiveFleet(tmp_path / "fleet") as fleet:
        fleet.reload(command_job("svc-job", [sys.executable, "-c", "print('ran by the unit')"]))
        token = fleet.worker_token("svc-a")
        token_file = tmp_path / "svc-a.token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        (tmp_path / "etc" / "systemd" / "system").mkdir(parents=True)
        (tmp_path / "run" / "systemd" / "system").mkdir(parents=True)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "systemctl").write_text(RECORDING_SYSTEMCTL)
        (bin_dir / "systemctl").chmod(0o755)
        calls = tmp_path / "systemctl.log"
        host_env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "SYSTEMCTL_LOG": str(calls),
            "TRAINFLEET_SYSTEMD_DIR": str(tmp_path / "etc" / "systemd" / "system"),
            "TRAINFLEET_ETC_DIR": str(tmp_path / "etc" / "trainfleet"),
            "TRAINFLEET_SYSTEMD_RUN_DIR": str(tmp_path / "run" / "systemd" / "system"),
            "TRAINFLEET_SERVICE_EUID": "0",
        }

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                trainfleet_argv(*args),
                env=host_env,
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )

        refused = cli(
            "join", "http://user:secret@127.0.0.1:1", "--token-file", str(token_file),
            "--service-name", "e2e", "--install-service",
        )  # fmt: skip
        assert refused.returncode == 1, refused.stderr
        assert "user name or password" in refused.stderr and "secret" not in refused.stderr
        assert not (tmp_path / "etc" / "trainfleet").exists()  # nothing written, no token

        workdir = tmp_path / "svc-work"
        installed = cli(
            "join", fleet.url, "--token-file", str(token_file), "--service-name", "e2e",
            "--service-user", "root", "--workdir", str(workdir), "--poll-interval-s", "0.2",
            "--threads", "1", "--install-service",
        )  # fmt: skip
        assert installed.returncode == 0, installed.stderr
        assert token not in installed.stdout + installed.stderr
        unit_path = tmp_path / "etc" / "systemd" / "system" / "trainfleet-worker-e2e.service"
        env_path = tmp_path / "etc" / "trainfleet" / "worker-e2e.env"
        unit = unit_path.read_text()
        assert token not in unit
        assert stat.S_IMODE(env_path.stat().st_mode) == 0o600
        assert "enable --now trainfleet-worker-e2e.service" in calls.read_text()

        argv, environment, cwd, stop_s = as_systemd_runs_it(unit)
        assert environment["TRAINFLEET_JOIN_TOKEN"] == token  # from the root-only file
        Path(cwd).mkdir(parents=True, exist_ok=True)  # systemd makes StateDirectory= / uses it
        log = (tmp_path / "service.log").open("w")
        proc = subprocess.Popen(
            argv, env=environment, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            job = fleet.wait_state("svc-job", {"completed", "failed"}, timeout_s=90)
            assert job["state"] == "completed", (tmp_path / "service.log").read_text()
            assert job["host"] == "svc-a"
            proc.send_signal(signal.SIGTERM)  # KillMode=mixed: the main process alone
            assert proc.wait(timeout=stop_s) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        workers = wait_until(
            lambda: [w for w in fleet.operator.workers() if w["host"] == "svc-a"],
            30,
            "the service's worker to be listed",
        )
        assert [w["state"] for w in workers] == ["stopped"]

        removed = cli("join", "--uninstall-service", "--service-name", "e2e")
        assert removed.returncode == 0, removed.stderr
        assert not unit_path.exists() and not env_path.exists()
        assert "disable --now trainfleet-worker-e2e.service" in calls.read_text()
