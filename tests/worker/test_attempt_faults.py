"""How an attempt ends under faults, against a fake coordinator that enforces the real
request schemas: every way ends in one report (or a quiet drop), and no job process outlives
its attempt."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from fakecoord import FakeClient, command_attempt

from trainfleet.errors import BadRequest, CoordinatorUnavailable, StaleEpoch
from trainfleet.worker import attempt as attempt_module
from trainfleet.worker.daemon import OUTCOME_FILE, tidy_attempt_dirs
from trainfleet.worker.disk import tree_bytes


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_job_that_prints_one_long_line_and_fails_is_failed_once(tmp_path: Path) -> None:
    client = FakeClient()
    code = "import sys; print('x' * 3_000_000); print('é' * 50_000); sys.exit(5)"
    outcome = command_attempt(client, code, tmp_path).run()
    assert outcome.status == "failed"
    [body] = [v for k, v in client.calls if k == "fail"]
    assert len(body["error"]) <= 20_000 and body["error"].startswith("exit code 5")
    assert client.kinds() == ["fail"]
    assert all(len(line) <= 4096 for line in client.lines)
    assert client.lines[0].startswith("xxxx") and "cut]" in client.lines[0]
    # The whole line is still on the worker's disk.
    assert (tmp_path / "jobs").glob("*/output.log")
    log_file = next((tmp_path / "jobs").glob("*/output.log"))
    assert log_file.stat().st_size > 3_000_000


def test_a_job_printing_many_lines_ships_them_all_in_accepted_batches(tmp_path: Path) -> None:
    client = FakeClient()
    code = "import sys\nfor i in range(25_000): print(i)\n"
    outcome = command_attempt(client, code, tmp_path).run()
    assert outcome.status == "completed", outcome.detail
    assert client.lines == [str(i) for i in range(25_000)]
    assert "dropped_log_lines" not in outcome.result


def test_lines_dropped_while_unreachable_are_counted_and_reported(tmp_path: Path) -> None:
    client = FakeClient()
    down = threading.Event()
    down.set()
    real_append = client.append_log

    def append_log(job_id: str, epoch: int, lines: list[str]) -> Any:
        if down.is_set():
            raise CoordinatorUnavailable("partitioned")
        return real_append(job_id, epoch, lines)

    client.append_log = append_log  # type: ignore[method-assign]
    code = "for i in range(3000): print(i)\n"
    attempt = command_attempt(client, code, tmp_path)
    attempt.spool.max_lines = 1000
    real_report = attempt._report

    def report(*args: Any) -> Any:
        down.clear()  # the coordinator is back for the report
        return real_report(*args)

    attempt._report = report  # type: ignore[method-assign]
    outcome = attempt.run()
    assert outcome.status == "completed", outcome.detail
    assert outcome.result["dropped_log_lines"] == 2001  # 2,000 lines plus room for the note
    assert client.lines[-1] == "[trainfleet] 2000 log lines dropped"
    assert client.lines[0] == "2001"


def test_non_finite_metrics_are_reported_as_null_with_a_flag(tmp_path: Path) -> None:
    client = FakeClient()
    code = (
        "import os, pathlib\n"
        "out = pathlib.Path(os.environ['TRAINFLEET_OUTPUT_DIR'])\n"
        '(out / \'metrics.json\').write_text(\'{"loss": NaN, "steps": 3, "best": -Infinity}\')\n'
    )
    outcome = command_attempt(client, code, tmp_path).run()
    assert outcome.status == "completed", outcome.detail
    [result] = [v for k, v in client.calls if k == "complete"]
    assert result["metrics"] == {"loss": None, "steps": 3, "best": None}
    assert result["non_finite"] == ["loss", "best"]


def test_a_metrics_file_that_is_not_an_object_fails_without_retry(tmp_path: Path) -> None:
    client = FakeClient()
    code = (
        "import os, pathlib\n"
        "(pathlib.Path(os.environ['TRAINFLEET_OUTPUT_DIR']) / 'metrics.json').write_text('[1]')\n"
    )
    outcome = command_attempt(client, code, tmp_path).run()
    assert outcome.status == "failed"
    [body] = [v for k, v in client.calls if k == "fail"]
    assert "JSON object" in body["error"] and body["retryable"] is False


def test_a_background_child_is_killed_and_not_waited_for(tmp_path: Path) -> None:
    client = FakeClient()
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '1000'])\n"  # inherits stdout: holds the pipe open
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('left a child behind')\n"
    )
    started = time.monotonic()
    outcome = command_attempt(client, code, tmp_path).run()
    assert outcome.status == "completed", outcome.detail
    assert time.monotonic() - started < 15  # not the 1000 s the child would hold the pipe
    child = int(pid_file.read_text())
    assert gone(child)


def test_a_fenced_heartbeat_kills_the_job_group_and_reports_nothing(tmp_path: Path) -> None:
    client = FakeClient()
    pid_file = tmp_path / "job.pid"

    def fenced() -> dict[str, Any]:
        if not (pid_file.exists() and pid_file.read_text()):  # the job is not up yet
            return {"cancel": False, "state": "running"}
        raise StaleEpoch("epoch 3 is stale", current_epoch=4)

    client.on_heartbeat = fenced
    code = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)"
    outcome = command_attempt(client, code, tmp_path).run()
    assert outcome.status == "fenced"
    assert client.kinds() == []
    assert gone(int(pid_file.read_text()))


def test_a_refused_heartbeat_fails_the_attempt_with_the_reason(tmp_path: Path) -> None:
    client = FakeClient()

    def refused() -> dict[str, Any]:
        raise BadRequest("body is not what it should be")

    client.on_heartbeat = refused
    outcome = command_attempt(client, "import time; time.sleep(60)", tmp_path).run()
    assert outcome.status == "failed"
    [body] = [v for k, v in client.calls if k == "fail"]
    assert "refused a heartbeat: body is not what it should be" in body["error"]


def test_an_unreachable_coordinator_past_the_lease_stops_the_job(tmp_path: Path) -> None:
    client = FakeClient()

    def down() -> dict[str, Any]:
        raise CoordinatorUnavailable("partitioned")

    client.on_heartbeat = down
    pid_file = tmp_path / "job.pid"
    code = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)"
    started = time.monotonic()
    outcome = command_attempt(client, code, tmp_path, lease_s=1.0).run()
    assert outcome.status == "lost"
    assert time.monotonic() - started < 10
    assert client.kinds() == []  # dropped: the coordinator has requeued it
    assert gone(int(pid_file.read_text()))


def test_a_full_disk_while_writing_output_hands_the_job_back_promptly(
    tmp_path: Path, monkeypatch
) -> None:
    real_open = Path.open

    class FullFile:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    def fake_open(self: Path, *args: Any, **kw: Any) -> Any:
        return FullFile() if self.name == "output.log" else real_open(self, *args, **kw)

    monkeypatch.setattr(Path, "open", fake_open)
    client = FakeClient()
    code = "import time\nfor i in range(600): print(i, flush=True); time.sleep(0.1)"
    started = time.monotonic()
    outcome = command_attempt(client, code, tmp_path).run()
    assert time.monotonic() - started < 15
    assert outcome.status == "released" and outcome.disk_full
    [body] = [v for k, v in client.calls if k == "fail"]
    assert body["release"] is True  # the worker's fault: no failure counted
    assert body["error"].startswith("disk full on worker: running the job")


@pytest.mark.parametrize("where", ["mkdir", "pack"])
def test_a_full_disk_elsewhere_hands_the_job_back_with_a_clear_reason(
    tmp_path: Path, monkeypatch, where: str
) -> None:
    def full(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "mkdir":
        monkeypatch.setattr(attempt_module, "ensure_dir", full)
    else:
        monkeypatch.setattr(attempt_module, "pack_dir", full)
    client = FakeClient()
    outcome = command_attempt(client, "print('hi')", tmp_path).run()
    assert outcome.status == "released" and outcome.disk_full
    [body] = [v for k, v in client.calls if k == "fail"]
    assert body["release"] is True
    assert body["error"].startswith("disk full on worker: ")


def test_a_job_that_fills_the_disk_itself_is_failed_not_handed_back(
    tmp_path: Path, monkeypatch
) -> None:
    """The rule that keeps such a job from going round forever (worker/disk.py): its own
    files take at least half of what was free when it started, so the failure counts."""
    jobs = tmp_path / "jobs"
    # A disk with 400 kB free before the attempt, less whatever the attempt writes.
    monkeypatch.setattr(
        attempt_module, "free_bytes", lambda path: max(0, 400_000 - tree_bytes(jobs))
    )
    code = (
        "import os, time\n"
        "out = os.path.join(os.environ['TRAINFLEET_OUTPUT_DIR'], 'big.bin')\n"
        "open(out, 'wb').write(b'x' * 380_000)\n"
        "time.sleep(60)\n"
    )
    client = FakeClient()
    started = time.monotonic()
    outcome = command_attempt(client, code, tmp_path).run()
    assert time.monotonic() - started < 15
    assert outcome.status == "failed" and outcome.disk_full
    [body] = [v for k, v in client.calls if k == "fail"]
    assert body["release"] is False and body["retryable"] is True
    assert body["error"].startswith("disk full on worker: running the job")
    assert "the attempt's own files take" in body["error"]


def test_a_worker_that_handed_a_job_back_too_often_counts_the_failure(
    tmp_path: Path, monkeypatch
) -> None:
    def full(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(attempt_module, "ensure_dir", full)
    client = FakeClient()
    outcome = command_attempt(client, "print('hi')", tmp_path, may_hand_back_disk=False).run()
    assert outcome.status == "failed" and outcome.disk_full
    [body] = [v for k, v in client.calls if k == "fail"]
    assert body["release"] is False and "too often" in body["error"]


def test_stop_hands_the_job_back_and_kills_its_group(tmp_path: Path) -> None:
    client = FakeClient()
    stop = threading.Event()
    pid_file = tmp_path / "job.pid"
    code = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # a job that ignores SIGTERM
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(60)"
    )
    attempt = command_attempt(client, code, tmp_path, stop=stop, term_grace_s=0.5)
    threading.Timer(1.0, stop.set).start()
    outcome = attempt.run()
    assert outcome.status == "released"
    [body] = [v for k, v in client.calls if k == "fail"]
    assert body["release"] is True
    assert gone(int(pid_file.read_text()))


def test_attempt_dirs_are_removed_on_success_and_failed_ones_are_bounded(
    tmp_path: Path,
) -> None:
    jobs = tmp_path / "jobs"
    made = []
    for i in range(8):
        d = jobs / f"job{i}-a1"
        d.mkdir(parents=True)
        made.append(d)
        tidy_attempt_dirs(d, "failed" if i != 3 else "completed", keep_failed=5)
    assert not made[3].exists()
    kept = sorted(p.name for p in jobs.iterdir())
    assert kept == ["job2-a1", "job4-a1", "job5-a1", "job6-a1", "job7-a1"]  # the newest 5
    assert all((jobs / k / OUTCOME_FILE).exists() for k in kept)
    assert made[7].exists()
