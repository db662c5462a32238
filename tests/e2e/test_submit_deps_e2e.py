"""End to end, job dependencies and ``trainfleet submit``: a real ``trainfleet serve`` process
(started with the manifest), a real ``trainfleet join`` worker, the real CLI.

A command job B submitted with ``after = ["A"]`` waits (``explain`` says so) while the
manifest's A runs, and runs once A completed; a job C submitted after a failing job F fails
with F's reason; a reload keeps the submitted jobs, and one that would close a cycle through
a submitted job is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from livefleet import command_job
from trainfleet.testing import ServedFleet

pytestmark = pytest.mark.slow


def manifest(gate: Path, a_after: list[str] | None = None) -> str:
    """A waits until ``gate`` exists (so the test sees B waiting on a running A); F fails."""
    wait = (
        "import os, sys, time\n"
        "end = time.time() + 120\n"
        f"while not os.path.exists({str(gate)!r}) and time.time() < end: time.sleep(0.05)\n"
        "print('a done')\n"
    )
    extra = {"after": a_after} if a_after else {}
    return command_job("A", [sys.executable, "-c", wait], **extra) + command_job(
        "F", [sys.executable, "-c", "import sys; print('f fails'); sys.exit(3)"], max_failures=1
    )


def test_submitted_jobs_wait_for_their_parents_and_survive_reloads(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    fleet_toml = tmp_path / "fleet.toml"
    fleet_toml.write_text(manifest(gate))
    (tmp_path / "fleet").mkdir()
    with ServedFleet(tmp_path / "fleet", serve_args=(str(fleet_toml),)) as fleet:
        out = fleet.cli(
            "submit", "--name", "B", "--after", "A", "--",
            sys.executable, "-c", "print('b ran')", check=True,
        ).stdout  # fmt: skip
        assert out.startswith("submitted B (") and out.rstrip().endswith(": waiting for A")
        fleet.cli("submit", "--name", "C", "--after", "F", "--", "true", check=True)

        worker = fleet.start_worker("cpu-a")
        fleet.wait_state("A", {"running"}, timeout_s=60)
        explained = fleet.cli("explain", "B", check=True).stdout
        assert "waiting for A (running)" in explained
        assert fleet.job("B")["job"]["state"] == "waiting"

        gate.touch()  # A may finish now
        assert fleet.wait_state("A", {"completed", "failed"}, 60)["state"] == "completed"
        b = fleet.wait_state("B", {"completed", "failed", "cancelled"}, timeout_s=60)
        assert b["state"] == "completed", b
        events = [e["kind"] for e in fleet.job("B")["events"]]
        assert events[:2] == ["added", "released"] and "completed" in events
        logs = fleet.cli("logs", "B", check=True).stdout
        assert "b ran" in logs

        c = fleet.wait_state("C", {"completed", "failed", "cancelled"}, timeout_s=60)
        f = fleet.job("F")["job"]
        assert f["state"] == "failed" and c["state"] == "failed"
        assert c["error"] == f"parent F failed: {f['error']}"
        assert c["attempt"] == 0  # it never ran

        # A reload keeps the submitted jobs...
        out = fleet.cli("reload", str(fleet_toml), check=True).stdout
        assert "0 removed" in out
        jobs = {j["name"]: j for j in fleet.operator.jobs()}
        assert jobs["B"]["state"] == "completed" and jobs["C"]["state"] == "failed"
        worker.sigterm()
        assert worker.wait(timeout=30) == 0

        # ...and one that would close a cycle through an unfinished submitted job is refused.
        fleet.cli("submit", "--name", "H", "--after", "A", "--", "true", check=True)
        fleet.wait_state("H", {"pending"}, timeout_s=30)  # released; no worker left to run it
        cyclic = tmp_path / "cyclic.toml"
        cyclic.write_text(manifest(gate, a_after=["H"]))
        refused = fleet.cli("reload", str(cyclic))
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "dependency cycle A -> H -> A (through submitted job(s) H)" in refused.stderr
        assert fleet.job("A")["job"]["spec"]["after"] == []
        assert {j["name"] for j in fleet.operator.jobs()} == {"A", "F", "B", "C", "H"}
