"""Fair share through the coordinator: ``GET /v1/fair-share`` (read auth), the explain line,
a completion over HTTP charged to the job's submitter, and the leader's tick loop that keeps
the pending jobs' levels (``coordinator.app``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_api import OP, OP_TOKEN, Api, assert_error, serve

from fleetkit import FakeClock, manifest_of
from trainfleet.queue import fairshare as fs
from trainfleet.queue.sqlite import SQLiteQueue

JOBS = """
[[jobs]]
name = "a1"
submitter = "alice"
hyper = { steps = 5 }

[[jobs]]
name = "a2"
submitter = "alice"
hyper = { steps = 5 }

[[jobs]]
name = "b1"
submitter = "bob"
hyper = { steps = 5 }
"""

MORE = """
[[jobs]]
name = "a3"
submitter = "alice"
hyper = { steps = 5 }

[[jobs]]
name = "b2"
submitter = "bob"
hyper = { steps = 5 }
"""


def test_fair_share_reports_each_submitter_and_needs_read_auth(api: Api, clock: FakeClock) -> None:
    api.reload(JOBS)
    worker = api.register()
    claim = api.claim(worker)
    assert claim["job"]["name"] == "a1"
    clock.advance(3600)
    r = api.http.post(
        f"/v1/jobs/{claim['job']['id']}/complete",
        json={"epoch": claim["epoch"], "result": {}},
        headers=worker.auth,
    )
    assert r.status_code == 200, r.text
    assert_error(api.http.get("/v1/fair-share"), 401, "unauthorized")
    assert_error(api.http.get("/v1/fair-share", headers=worker.auth), 401, "unauthorized")
    r = api.http.get("/v1/fair-share", headers=OP)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["half_life_h"], body["interval_s"]) == (168.0, 5.0)
    rows = {row["submitter"]: row for row in body["submitters"]}
    assert set(rows) == {"alice", "bob"}
    assert rows["alice"]["usage_h"] == pytest.approx(fs.interval_hours(0, 3600, 168.0))
    assert (rows["alice"]["usage"], rows["alice"]["share"], rows["alice"]["level"]) == (1, 0.5, 8)
    assert (rows["alice"]["pending"], rows["bob"]["pending"], rows["bob"]["level"]) == (1, 1, 0)
    assert api.client(OP_TOKEN).fair_share() == body
    explained = api.http.get("/v1/jobs/a2/explain", headers=OP).json()["message"]
    assert "fair share: submitter alice used 1.0 job-hours recently" in explained
    assert "level 8 of 10" in explained


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_leader_ticks_at_start_and_again_on_its_interval(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The loop ticks at start and then every ``[fair_share] interval_s``: a new job of a
    heavy submitter gets its level without anyone asking."""
    queue = SQLiteQueue(tmp_path / "q.db", clock=clock)
    queue.apply_manifest(manifest_of("[fair_share]\ninterval_s = 0.05\n" + JOBS))
    with queue.db.tx() as conn:
        fs.charge(conn, "alice", 5.0, clock.now, 168.0)
    queue.close()

    def fair(api: Api) -> dict[str, int]:
        rows = api.coord.queue._conn().execute("SELECT name, fair FROM jobs")  # type: ignore[attr-defined]
        return {r["name"]: r["fair"] for r in rows}

    with serve(tmp_path, clock) as api:  # the same database file
        wait_for(lambda: fair(api) == {"a1": 8, "a2": 8, "b1": 0})
        api.reload("[fair_share]\ninterval_s = 0.05\n" + JOBS + MORE)
        assert fair(api)["a3"] == 0  # inserted at level 0...
        wait_for(lambda: fair(api)["a3"] == 8)  # ...and set by a tick
        assert fair(api)["b2"] == 0
