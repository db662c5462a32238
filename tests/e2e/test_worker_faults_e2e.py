"""The worker's failure paths against a live coordinator and real `trainfleet join` daemons,
with faults injected by the harness (trainfleet.testing): each ends cleanly, in a bounded
time, and no job process outlives its attempt."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from livefleet import Fleet, command_job, slow_job, wait_until
from trainfleet.testing import disk_faults_unavailable

pytestmark = pytest.mark.slow


def python_job(name: str, code: str, **extra: object) -> str:
    """A command job that runs ``python -c CODE``."""
    return command_job(name, [sys.executable, "-c", code], **extra)


def test_a_job_printing_one_long_line_then_failing_is_failed_not_lost(fleet: Fleet) -> None:
    """The issue's repro: the failure report used to be refused (too long), the next claim
    got 409 and the daemon exited; the job was then charged as lost on every worker."""
    code = "import sys; print('x' * 300_000); print('y' * 30_000, file=sys.stderr); sys.exit(4)"
    fleet.reload(python_job("loud", code, max_failures=1) + slow_job("after", 0.2))
    w = fleet.start_worker("cpu-a")
    job = fleet.wait_state("loud", {"failed", "completed"}, timeout_s=30)
    assert job["state"] == "failed" and job["error"].startswith("exit code 4")
    assert len(job["error"]) <= 20_000
    kinds = [e["kind"] for e in fleet.job("loud")["events"]]
    assert "attempt_failed" in kinds and "lost" not in kinds
    # The same daemon goes on to the next job.
    assert fleet.wait_state("after", {"completed"}, timeout_s=30)["host"] == "cpu-a"
    assert w.poll() is None
    # Registered, ran, reported and uploaded without loading torch (its jobs load it).
    assert "libtorch" not in Path(f"/proc/{w.pid}/maps").read_text()
    lines = fleet.operator.logs("loud")["lines"]
    assert any(len(line["line"]) <= 4096 and line["line"].startswith("xxx") for line in lines)


def test_a_lost_claim_reply_is_recovered_without_a_new_attempt(fleet: Fleet) -> None:
    fleet.reload(slow_job("j", 0.2))
    w = fleet.start_worker("cpu-a", "--exit-when-idle-s", "3")
    w.proxy.drop_reply("POST", r"/claim$", times=1)
    w.proxy.wait_for("POST", r"/claim$", fault="dropped", timeout_s=20)
    job = fleet.wait_state("j", {"completed", "failed"}, timeout_s=30)
    assert job["state"] == "completed" and job["attempt"] == 1 and job["epoch"] == 1
    assert "redelivered" in [e["kind"] for e in fleet.job("j")["events"]]
    assert w.wait(timeout=30) == 0


def test_a_killed_daemon_takes_its_job_group_down(fleet: Fleet) -> None:
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen(['sleep', '1000'])\n"  # a grandchild in the job's group
        "print('started', flush=True)\n"
        "time.sleep(1000)\n"
    )
    fleet.reload(python_job("long", code))
    w = fleet.start_worker("cpu-a")
    fleet.wait_state("long", {"running"}, timeout_s=30)
    wait_until(lambda: len(w.job_pids()) >= 2, 20, "the job and its grandchild to start")
    w.kill_daemon()  # kill -9 of the daemon alone: the OOM killer's way
    wait_until(lambda: not w.job_pids(), 10, "the orphaned job group to die")


def test_a_background_child_is_killed_and_does_not_hold_up_the_report(fleet: Fleet) -> None:
    fleet.reload(
        '[[jobs]]\nname = "bg"\nkind = "command"\ncommand = ["sh", "-c", "sleep 1000 & echo bye"]\n'
    )
    w = fleet.start_worker("cpu-a")
    job = fleet.wait_state("bg", {"completed", "failed"}, timeout_s=20)
    assert job["state"] == "completed"
    wait_until(lambda: not w.job_pids(), 5, "the background child to be killed")
    # The attempt's directory is gone once its result was accepted.
    wait_until(lambda: not any((w.workdir / "jobs").glob("*")), 5, "the attempt dir cleanup")


def test_a_partitioned_worker_stops_its_job_after_the_heartbeat_timeout(fleet: Fleet) -> None:
    fleet.reload(slow_job("long", 60.0, max_failures=3))
    w = fleet.start_worker("cpu-a")
    fleet.wait_state("long", {"running"}, timeout_s=30)
    wait_until(lambda: w.job_pids(), 10, "the job to start")
    w.proxy.partition()
    fleet.wait_state("long", {"pending"}, timeout_s=15)  # reaped as lost by the coordinator
    wait_until(lambda: not w.job_pids(), 10, "the partitioned worker to stop its job")
    assert "no heartbeat accepted" in w.log_text()
    w.proxy.heal()
    assert w.poll() is None


def test_non_finite_metrics_are_reported_as_null_with_a_flag(fleet: Fleet) -> None:
    code = (
        "import os, pathlib\n"
        "out = pathlib.Path(os.environ['TRAINFLEET_OUTPUT_DIR'])\n"
        "(out / 'metrics.json').write_text('{\"loss\": NaN, \"steps\": 2}')\n"
    )
    fleet.reload(python_job("nan", code))
    fleet.start_worker("cpu-a")
    job = fleet.wait_state("nan", {"completed", "failed"}, timeout_s=30)
    assert job["state"] == "completed", job["error"]
    assert job["result"]["metrics"] == {"loss": None, "steps": 2}
    assert job["result"]["non_finite"] == ["loss"]
    assert fleet.cli("show", "nan").returncode == 0


def test_sigterm_while_a_claim_is_in_flight_stops_promptly_and_hands_it_back(
    fleet: Fleet,
) -> None:
    w = fleet.start_worker("cpu-a")
    wait_until(lambda: fleet.coord.work.waiting == 1, 20, "the claim to wait for work")
    w.sigterm()  # lands while the (long-poll) claim is in flight
    assert w.wait(timeout=10) == 0
    # Work arrives and wakes the abandoned claim: the worker has left, so it takes nothing.
    fleet.reload(slow_job("j", 30.0))
    answered = w.proxy.wait_for("POST", r"/claim$", timeout_s=30)
    assert answered.status == 401, answered
    job = fleet.job("j")["job"]
    assert job["state"] == "pending" and job["attempt"] == 0  # never held by a gone worker
    assert not w.job_pids()


def test_sigterm_hands_a_running_job_back_and_kills_its_group(fleet: Fleet) -> None:
    fleet.reload(slow_job("j", 30.0))
    w = fleet.start_worker("cpu-a")
    fleet.wait_state("j", {"running"}, timeout_s=30)
    w.sigterm()
    assert w.wait(timeout=20) == 0
    job = fleet.job("j")["job"]
    assert job["state"] == "pending" and job["num_failures"] == 0
    assert not w.job_pids()


def test_a_full_disk_hands_the_job_back_and_it_completes_once_there_is_space(
    fleet: Fleet,
) -> None:
    """A full disk is the worker's fault, not the job's: the attempt is handed back (no
    failure counted, the reason in the event), the worker claims nothing while its disk is
    full, and the job completes once there is space again."""
    if reason := disk_faults_unavailable():
        pytest.skip(reason)
    # Long on its first attempt (so the disk fills while it runs), short afterwards.
    code = (
        "import os, time\n"
        "print('attempt', os.environ['TRAINFLEET_ATTEMPT'], flush=True)\n"
        "time.sleep(60 if os.environ['TRAINFLEET_ATTEMPT'] == '1' else 0.2)\n"
    )
    fleet.reload(python_job("chatty", code, max_failures=1))
    w = fleet.start_worker("cpu-a", disk_mib=16)
    fleet.wait_state("chatty", {"running"}, timeout_s=30)
    w.fill_disk()
    job = fleet.wait_state("chatty", {"pending", "failed"}, timeout_s=20)
    assert job["state"] == "pending" and job["num_failures"] == 0
    assert job["error"].startswith("disk full on worker")
    [released] = [e for e in fleet.job("chatty")["events"] if e["kind"] == "released"]
    assert released["detail"].startswith("disk full on worker")
    wait_until(lambda: not w.job_pids(), 10, "the job to be stopped")
    wait_until(
        lambda: "not claiming jobs until there is space" in w.log_text(), 10, "the worker to wait"
    )
    assert fleet.job("chatty")["job"]["state"] == "pending"  # not claimed again meanwhile
    w.free_disk()
    job = fleet.wait_state("chatty", {"completed", "failed"}, timeout_s=30)
    assert job["state"] == "completed" and job["num_failures"] == 0 and job["host"] == "cpu-a"
    assert w.poll() is None  # the daemon itself went on throughout


@pytest.mark.parametrize(
    ("method", "path"), [("PUT", r"/artifacts/"), ("POST", r"/complete$")], ids=["upload", "done"]
)
def test_a_lost_report_reply_is_retried_and_lands_once(
    fleet: Fleet, method: str, path: str
) -> None:
    fleet.reload(slow_job("j", 0.2))
    w = fleet.start_worker("cpu-a", "--exit-when-idle-s", "3")
    w.proxy.drop_reply(method, path, times=1)  # committed, then the reply is lost
    job = fleet.wait_state("j", {"completed", "failed"}, timeout_s=30)
    assert job["state"] == "completed" and job["attempt"] == 1
    detail = fleet.job("j")
    assert [e["kind"] for e in detail["events"]].count("completed") == 1
    assert len(detail["artifacts"]) == 1
    assert w.proxy.seen(method, path, fault="dropped")
    assert w.wait(timeout=30) == 0
    assert "j completed" in w.log_text()
