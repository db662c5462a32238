"""The harness's process faults and teardown: kill the job alone, kill the daemon alone, a
disk that really fills, and nothing the fleet started outlives it."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from trainfleet.testing import LiveFleet, disk_faults_unavailable, wait_until
from trainfleet.testing.worker import tagged_processes

pytestmark = pytest.mark.slow

SLOW_JOB = str(Path(__file__).parents[1] / "e2e" / "scripts" / "slow_job.py")
LONG = (
    f'[[jobs]]\nname = "long"\nkind = "command"\ncommand = ["{sys.executable}", "{SLOW_JOB}"]\n'
    "hyper = { seconds = 60 }\n"
)


def test_kill_job_kills_only_the_job_and_teardown_kills_everything(tmp_path: Path) -> None:
    with LiveFleet(tmp_path) as fleet:
        fleet.reload(LONG)
        worker = fleet.start_worker("cpu-a")
        fleet.wait_state("long", {"running"}, timeout_s=30)
        [job_pid] = wait_until(worker.job_pids, 30, "the job process")
        assert worker.proxy is not None
        worker.proxy.wait_for("POST", r"/heartbeat$", timeout_s=10)
        assert worker.kill_job() == [job_pid]  # its own process group
        wait_until(lambda: not psutil.pid_exists(job_pid) or not worker.job_pids(), 10, "kill")
        assert worker.poll() is None  # the daemon lives on
        # It takes the job again (a retry); now kill the daemon under it.
        orphan = wait_until(lambda: set(worker.job_pids()) - {job_pid}, 30, "the retry")
        assert worker.job_names() == ["long"]
        worker.kill_daemon()
        assert worker.poll() is not None
        daemon_pids = [worker.pid]
    # Whatever the worker does about its orphan, the harness leaves nothing behind.
    assert not tagged_processes(fleet.tag)
    assert all(gone(p) for p in [*orphan, *daemon_pids])


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for its (re-)parent to reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_fill_disk_makes_the_workdir_run_out_of_space(tmp_path: Path) -> None:
    reason = disk_faults_unavailable()
    if reason is not None:
        pytest.skip(f"disk faults unavailable here: {reason}")
    with LiveFleet(tmp_path) as fleet:
        worker = fleet.start_worker("cpu-a", disk_mib=4)
        assert worker.disk is not None
        assert worker.fill_disk() > 3 * 2**20
        with pytest.raises(OSError) as err:
            (worker.workdir / "more").write_bytes(b"x" * 8192)
        assert err.value.errno == errno.ENOSPC
        worker.free_disk()
        (worker.workdir / "more").write_bytes(b"x" * 8192)
        mounts = subprocess.run(["mount"], capture_output=True, text=True).stdout
        assert str(worker.workdir) in mounts
    mounts = subprocess.run(["mount"], capture_output=True, text=True).stdout
    assert str(worker.workdir) not in mounts  # unmounted at teardown


def test_a_failing_test_still_leaves_no_process_behind(tmp_path: Path) -> None:
    fleet = LiveFleet(tmp_path)
    with pytest.raises(RuntimeError, match="the test failed"), fleet:
        fleet.reload(LONG)
        worker = fleet.start_worker("cpu-a")
        wait_until(worker.job_pids, 30, "the job process")
        raise RuntimeError("the test failed")
    assert not tagged_processes(fleet.tag)
    assert worker.poll() is not None


def test_sigterm_lands_while_a_claim_is_held_in_flight(tmp_path: Path) -> None:
    with LiveFleet(tmp_path) as fleet:
        # A plain claim, waited for to the end; a SIGTERM abandons a long poll instead (that
        # case: tests/e2e/test_worker_faults_e2e.py).
        worker = fleet.start_worker("cpu-a", "--claim-wait-s", "0")
        assert worker.proxy is not None
        worker.sigterm_during("POST", r"/claim$", hold_s=1.0, timeout_s=20)
        assert worker.proxy.arrived("POST", r"/claim$", fault="delayed")
        assert not worker.proxy.seen("POST", r"/claim$", fault="delayed")  # still held
        assert worker.wait(timeout=30) == 0  # a graceful stop
        assert worker.proxy.wait_for("POST", r"/claim$", fault="delayed", timeout_s=10)
