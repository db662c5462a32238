"""A run's life across coordinator restarts and manifest reloads: a restart mid-run (even
one that died inside a close) ends at the weights an uninterrupted run reaches; removing a
run pauses it, adding it back resumes it, a new identity under its name supersedes it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from runkit import DATASET, claim, fake_eval, finish, run_detail, run_toml, tick
from test_api import OP, Api, Worker, serve

from fleetkit import FakeClock
from trainfleet.queue.runs_base import RoundOutcome

TEXT = run_toml(replicas=2, rounds=3, min_quorum=2)


def _play_round(api: Api, workers: list[Worker]) -> None:
    """Every worker claims a task of the open round and finishes it."""
    tasks = [claim(api, w) for w in workers]
    api.clock.advance(5)
    for t in tasks:
        assert t is not None
        finish(api, t)


def _final_weights(tmp_path: Path, clock: FakeClock, crash_in_round: int | None) -> str:
    with serve(tmp_path, clock) as api:
        api.coord.rounds.evaluate = fake_eval
        api.reload(TEXT)
        tick(api)
        workers = [api.register("cpu-a"), api.register("cpu-b")]
        for r in range(3):
            if r == crash_in_round:

                def crash(_outcome: RoundOutcome) -> bool:
                    raise RuntimeError("coordinator died inside the close")

                api.coord.queue.close_round = crash  # type: ignore[method-assign, assignment]
                _play_round(api, workers)
                detail = tick(api)  # the close fails: logged, nothing written
                assert detail["rounds"][r]["state"] == "open"
                break
            _play_round(api, workers)
            tick(api)
        else:
            return str(run_detail(api)["run"]["weights"])
    with serve(tmp_path, clock) as api:  # the restart: same database and artifacts
        api.coord.rounds.evaluate = fake_eval
        detail = tick(api)
        assert detail["rounds"][crash_in_round]["state"] == "closed"
        for _ in range(crash_in_round + 1, 3):
            _play_round(api, workers)
            detail = tick(api)
        assert detail["run"]["state"] == "completed"
        assert [r["round"] for r in detail["rounds"]] == [0, 1, 2]
        applied = [c["applied_in_round"] for c in detail["contributions"]]
        assert applied == [0, 0, 1, 1, 2, 2]  # every contribution applied exactly once
        return str(detail["run"]["weights"])


def test_a_restart_inside_a_close_ends_at_the_uninterrupted_weights(tmp_path: Path) -> None:
    straight = _final_weights(tmp_path / "straight", FakeClock(), None)
    crashed = _final_weights(tmp_path / "crashed", FakeClock(), 1)
    assert crashed == straight


@pytest.fixture
def api(tmp_path: Path, clock: FakeClock) -> Iterator[Api]:
    with serve(tmp_path, clock) as a:
        a.coord.rounds.evaluate = fake_eval
        yield a


def _plan(api: Api, text: str) -> list[tuple[str, str]]:
    return [(e["name"], e["state"]) for e in api.reload(text)["runs"]]


def test_removing_a_run_pauses_it_and_adding_it_back_resumes_it(api: Api) -> None:
    assert _plan(api, TEXT) == [("dl", "added")]
    tick(api)
    w = api.register("cpu-a")
    assert api.reload(DATASET, dry_run=True)["runs"][0]["state"] == "removed"
    assert run_detail(api)["run"]["state"] == "active"  # a dry run changes nothing
    assert _plan(api, DATASET) == [("dl", "removed")]
    assert run_detail(api)["run"]["state"] == "paused"
    r = api.http.post("/v1/workers/claim", headers=w.auth)
    assert r.json()["claim"] is None  # its pending tasks are not claimable
    assert _plan(api, TEXT) == [("dl", "changed")]
    assert run_detail(api)["run"]["state"] == "active"
    assert claim(api, w) is not None
    assert _plan(api, TEXT) == [("dl", "kept")]


def test_a_new_identity_under_a_run_name_supersedes_the_old_run(api: Api) -> None:
    api.reload(TEXT)
    tick(api)
    w = api.register("cpu-a")
    held = claim(api, w)
    assert held is not None
    old_id = run_detail(api)["run"]["id"]
    plan = api.reload(run_toml(replicas=2, rounds=3, min_quorum=2, inner_steps=5))
    (entry,) = plan["runs"]
    assert entry["state"] == "changed" and entry["changes"]["id"][0] == old_id
    detail = tick(api)
    assert detail["run"]["id"] == entry["id"] != old_id
    assert [r["state"] for r in detail["same_name"]] == ["superseded"]
    assert detail["rounds"][0]["state"] == "open"
    assert api.job(held.job_id)["job"]["state"] == "cancelled"
    # The heartbeat book answers beats from memory and hears of the cancel when it flushes
    # one of them (coordinator.beats): the worker learns it at its next beat after that.
    beat = f"/v1/jobs/{held.job_id}/heartbeat"
    api.http.post(beat, json={"epoch": held.epoch}, headers=w.auth)
    api.flush()
    r = api.http.post(beat, json={"epoch": held.epoch}, headers=w.auth)
    assert r.json()["cancel"] is True
    runs = api.http.get("/v1/runs", headers=OP).json()["runs"]
    assert [(r["name"], r["state"]) for r in runs] == [("dl", "superseded"), ("dl", "active")]
