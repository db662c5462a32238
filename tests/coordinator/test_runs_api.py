"""Collaborative runs through the coordinator's HTTP API, in-process, with scripted fake
replica workers (``runkit``) on the test's fake clock.

API summary (the details and JSON shapes: ``trainfleet.coordinator.routes_runs``'s doc):

- ``POST /v1/workers/claim`` hands out replica tasks like any job: ``claim.job.spec.kind ==
  "replica"``, ``claim.job.spec.task`` is a ``ReplicaTask`` (run, run_id, round, replica,
  weights sha256, inner_steps, ...).
- ``GET /v1/weights/{sha256}`` (worker token): the round's global weights (safetensors).
- upload the pseudo-gradient with ``PUT /v1/jobs/{id}/artifacts/{sha}?epoch=&size=&name=``,
  then ``POST /v1/jobs/{id}/complete`` with ``result = {"metrics": {"inner_steps_done",
  "compute_s", ...}, "artifact": sha, "artifact_size": n, "contribution": {...}}``; the reply's
  ``result.verdict`` = ``{"status": accepted|refused|dropped, "reason", "norm"}``.
- ``GET /v1/runs`` -> ``{"runs": [RunRecord]}``; ``GET /v1/runs/{name or id}`` ->
  ``{"run", "rounds", "contributions", "same_name"}`` (operator token / public reads).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from runkit import (
    Task,
    claim,
    decoded,
    expected_weights,
    fake_eval,
    finish,
    pseudo_gradient,
    run_detail,
    run_toml,
    sha_of,
    tick,
    weights,
)
from test_api import OP, Api, Worker, serve

from fleetkit import FakeClock
from trainfleet.testing import wait_until


@pytest.fixture
def api(tmp_path: Path, clock: FakeClock) -> Iterator[Api]:
    with serve(tmp_path, clock) as a:
        a.coord.rounds.evaluate = fake_eval
        yield a


def test_a_round_closes_at_full_quorum_with_the_outer_step_applied(api: Api) -> None:
    plan = api.reload(run_toml(rounds=2))
    assert [(e["name"], e["state"]) for e in plan["runs"]] == [("dl", "added")]
    detail = tick(api)
    assert detail["run"]["state"] == "active"
    (r0,) = detail["rounds"]
    assert r0["state"] == "open" and r0["round"] == 0
    workers = [api.register(f"cpu-{c}") for c in "abc"]
    tasks = [claim(api, w) for w in workers]
    assert all(t is not None for t in tasks)
    assert sorted(t.task["replica"] for t in tasks if t) == [0, 1, 2]
    assert {t.task["weights"] for t in tasks if t} == {r0["weights"]}
    _, start = weights(api, workers[0], r0["weights"])
    for t in tasks:
        assert t is not None
        job = finish(api, t)
        assert job["state"] == "completed"
        assert job["result"]["verdict"]["status"] == "accepted"
    detail = tick(api)
    r0, r1 = detail["rounds"]
    assert r0["state"] == "closed" and r0["accepted"] == 3 and r0["refused"] == 0
    assert r0["heldout_loss"] is not None
    assert r0["bytes_up"] > 0 and r0["bytes_down"] >= 4 * r0["weights_size"]
    want, _ = expected_weights(
        start, [(decoded(start, 0, k), 0, 1.0) for k in range(3)], None, 0.7, 0.9
    )
    assert r0["next_weights"] == sha_of(want) == r1["weights"]
    assert detail["run"]["round"] == 1 and detail["run"]["momentum"] is not None
    assert [c["status"] for c in detail["contributions"]] == ["applied"] * 3
    listing = api.http.get("/v1/runs", headers=OP).json()
    assert [r["name"] for r in listing["runs"]] == ["dl"]
    # round 1 (the last): all report again, the run completes
    for w in workers:
        t = claim(api, w)
        assert t is not None and t.task["round"] == 1 and t.task["global_step"] == 4
        finish(api, t)
    detail = tick(api)
    assert detail["run"]["state"] == "completed" and detail["run"]["round"] == 2
    assert [r["state"] for r in detail["rounds"]] == ["closed", "closed"]
    scraped = api.http.get("/metrics", headers=OP).text
    assert 'trainfleet_run_contributions_total{verdict="accepted"} 6.0' in scraped
    assert "trainfleet_run_rounds_closed_total 2.0" in scraped
    assert api.coord.queue.is_bound(detail["run"]["weights"])
    assert api.coord.queue.is_bound(detail["run"]["momentum"])


def _round0(api: Api, text: str, hosts: str = "abc") -> tuple[list[Worker], list[Task], dict]:
    api.reload(text)
    r0 = tick(api)["rounds"][0]
    workers = [api.register(f"cpu-{c}") for c in hosts]
    tasks = [claim(api, w) for w in workers]
    assert all(t is not None for t in tasks)
    return workers, [t for t in tasks if t is not None], r0


def test_a_straggler_is_waited_for_then_applied_late_and_damped(api: Api) -> None:
    text = run_toml(rounds=3, min_quorum=2, straggler_wait=0.5, max_staleness=1)
    workers, tasks, r0 = _round0(api, text)
    _, start = weights(api, workers[0], r0["weights"])
    api.clock.advance(10)
    finish(api, tasks[0])
    finish(api, tasks[1])  # quorum at t0 + 10: the straggler is waited for until t0 + 15
    api.clock.advance(4)
    assert tick(api)["rounds"][0]["state"] == "open"
    api.clock.advance(1)
    detail = tick(api)
    r0, r1 = detail["rounds"]
    assert r0["state"] == "closed" and r0["accepted"] == 2
    assert r0["quorum_at"] == r0["opened_at"] + 10
    m0_want, m0 = expected_weights(
        start, [(decoded(start, 0, k), 0, 1.0) for k in (0, 1)], None, 0.7, 0.9
    )
    assert r1["weights"] == sha_of(m0_want)
    # the straggler (slot 2) finishes during round 1: accepted, one round stale
    late = finish(api, tasks[2])
    assert late["result"]["verdict"]["status"] == "accepted"
    # round 1: slots 0 and 1 go back to the workers that had them (affinity)
    got = {w.id: claim(api, w) for w in reversed(workers)}
    slots = {wid: t.task["replica"] for wid, t in got.items() if t is not None}
    assert slots[workers[0].id] == 0 and slots[workers[1].id] == 1 and slots[workers[2].id] == 2
    _, start1 = weights(api, workers[0], r1["weights"])
    api.clock.advance(10)  # quorum takes time, so the straggler wait is not zero
    for t in got.values():
        assert t is not None
        finish(api, t)
    detail = tick(api)
    r1 = detail["rounds"][1]
    assert r1["state"] == "closed" and r1["accepted"] == 3 and r1["late_applied"] == 1
    late_c = [c for c in detail["contributions"] if c["round"] == 0 and c["replica"] == 2]
    assert late_c[0]["status"] == "applied" and late_c[0]["applied_in_round"] == 1
    assert late_c[0]["staleness"] == 1
    deltas = [(decoded(start, 0, 2), 1, 1.0)] + [(decoded(start1, 1, k), 0, 1.0) for k in range(3)]
    want, _ = expected_weights(start1, deltas, m0, 0.7, 0.9)
    assert detail["rounds"][2]["weights"] == sha_of(want)


def test_a_nan_pseudo_gradient_is_refused_with_its_reason_and_the_round_goes_on(api: Api) -> None:
    _workers, tasks, _ = _round0(api, run_toml(min_quorum=2))
    finish(api, tasks[0])
    bad = finish(api, tasks[1], data=pseudo_gradient(api, tasks[1], nan=True))
    assert bad["state"] == "completed"
    assert bad["result"]["verdict"]["status"] == "refused"
    assert "non-finite" in bad["result"]["verdict"]["reason"]
    finish(api, tasks[2])
    detail = tick(api)
    r0 = detail["rounds"][0]
    assert r0["state"] == "closed" and r0["accepted"] == 2 and r0["refused"] == 1
    statuses = {c["replica"]: (c["status"], c["reason"]) for c in detail["contributions"]}
    assert statuses[1][0] == "refused" and "non-finite" in statuses[1][1]
    assert statuses[0][0] == statuses[2][0] == "applied"


def test_an_outlier_is_refused_at_the_close(api: Api) -> None:
    _workers, tasks, _ = _round0(api, run_toml(min_quorum=3, outlier_factor=5.0))
    finish(api, tasks[0])
    finish(api, tasks[1], data=pseudo_gradient(api, tasks[1], scale=100.0))
    finish(api, tasks[2])
    detail = tick(api)
    r0 = detail["rounds"][0]
    assert r0["state"] == "closed" and r0["accepted"] == 2 and r0["refused"] == 1
    (outlier,) = [c for c in detail["contributions"] if c["replica"] == 1]
    assert outlier["status"] == "refused" and "median" in outlier["reason"]


def test_a_round_below_quorum_at_its_timeout_stays_open(api: Api) -> None:
    _workers, tasks, _ = _round0(api, run_toml(min_quorum=2, round_timeout_s=60.0))
    finish(api, tasks[0])
    for t in tasks[1:]:  # the others keep beating, but take their time
        r = api.http.post(
            f"/v1/jobs/{t.job_id}/heartbeat", json={"epoch": t.epoch}, headers=t.worker.auth
        )
        assert r.status_code == 200
    api.clock.advance(61)
    for t in tasks[1:]:
        api.http.post(
            f"/v1/jobs/{t.job_id}/heartbeat", json={"epoch": t.epoch}, headers=t.worker.auth
        )
    r0 = tick(api)["rounds"][0]
    assert r0["state"] == "open"
    assert "timed out" in r0["detail"]
    finish(api, tasks[1])  # quorum, past the timeout: closes
    detail = tick(api)
    assert detail["rounds"][0]["state"] == "closed" and detail["rounds"][0]["accepted"] == 2
    # the third task of round 0 is still running: it was not cancelled
    assert api.job(tasks[2].job_id)["job"]["state"] == "running"


def test_a_reaped_task_is_reclaimed_with_byte_identical_weights(api: Api) -> None:
    workers, tasks, r0 = _round0(api, run_toml(replicas=2, min_quorum=2), hosts="ab")
    first, _ = weights(api, workers[0], tasks[0].task["weights"])
    api.clock.advance(11)  # past heartbeat_timeout_s (10): worker a's claim is lost
    r = api.http.post(
        f"/v1/jobs/{tasks[1].job_id}/heartbeat",
        json={"epoch": tasks[1].epoch},
        headers=workers[1].auth,
    )
    assert r.status_code == 200
    api.reap()
    c = api.register("cpu-c")
    again = claim(api, c)
    assert again is not None and again.job_id == tasks[0].job_id and again.epoch == 2
    assert again.task == tasks[0].task
    second, _ = weights(api, c, again.task["weights"])
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest() == r0["weights"]
    finish(api, again)
    finish(api, tasks[1])
    assert tick(api)["rounds"][0]["accepted"] == 2


def test_the_same_completion_twice_is_recorded_once(api: Api) -> None:
    workers, tasks, _ = _round0(api, run_toml())
    data = pseudo_gradient(api, tasks[0])
    one = finish(api, tasks[0], data=data)
    result = {k: v for k, v in one["result"].items() if k != "verdict"}
    r = api.http.post(
        f"/v1/jobs/{tasks[0].job_id}/complete",
        json={"epoch": tasks[0].epoch, "result": result},
        headers=workers[0].auth,
    )
    assert r.status_code == 200, r.text
    assert r.json()["result"]["verdict"] == one["result"]["verdict"]
    detail = run_detail(api)
    assert len(detail["contributions"]) == 1
    assert detail["rounds"][0]["bytes_up"] == len(data)


def test_a_contribution_later_than_max_staleness_is_dropped(api: Api) -> None:
    _workers, tasks, _ = _round0(
        api, run_toml(rounds=3, min_quorum=2, straggler_wait=0.0, max_staleness=0)
    )
    api.clock.advance(5)
    finish(api, tasks[0])
    finish(api, tasks[1])
    assert tick(api)["rounds"][0]["state"] == "closed"
    late = finish(api, tasks[2])
    assert late["result"]["verdict"]["status"] == "dropped"
    assert "too stale" in late["result"]["verdict"]["reason"]


def test_weights_are_served_only_for_run_rounds_and_only_to_workers(api: Api) -> None:
    workers, tasks, r0 = _round0(api, run_toml(replicas=1, min_quorum=1), hosts="a")
    assert api.http.get(f"/v1/weights/{r0['weights']}", headers=OP).status_code == 401
    data = pseudo_gradient(api, tasks[0])
    api.upload(workers[0], tasks[0].job_id, tasks[0].epoch, data)
    other = hashlib.sha256(data).hexdigest()  # stored, but not a run's weights
    r = api.http.get(f"/v1/weights/{other}", headers=workers[0].auth)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert api.http.get("/v1/runs/nope", headers=OP).status_code == 404


def test_a_slot_waits_two_seconds_for_its_previous_worker_then_anyone_takes_it(api: Api) -> None:
    workers, tasks, _ = _round0(api, run_toml(replicas=2, min_quorum=2), hosts="ab")
    by_worker = {t.worker.id: t.task["replica"] for t in tasks}
    for t in tasks:
        finish(api, t)
    assert tick(api)["rounds"][0]["state"] == "closed"
    newcomer = api.register("cpu-c")
    r = api.http.post("/v1/workers/claim", headers=newcomer.auth)
    assert r.json()["claim"] is None  # both slots wait for the workers that had them
    api.clock.advance(2.5)
    got = claim(api, newcomer)
    assert got is not None and got.task["round"] == 1
    assert got.task["replica"] == 0
    again = claim(api, workers[1])
    assert again is not None and again.task["replica"] == 1 == by_worker[workers[1].id]


def test_warmup_rounds_take_one_step_and_a_plain_average(api: Api) -> None:
    text = run_toml(replicas=2, min_quorum=2, rounds=3, warmup_rounds=1, adaptive_inner_steps=True)
    workers, tasks, r0 = _round0(api, text, hosts="ab")
    assert [t.task["inner_steps"] for t in tasks] == [1, 1]
    assert all(t.task["warmup"] and t.task["global_step"] == 0 for t in tasks)
    assert {t.task["total_steps"] for t in tasks} == {1 + 2 * 4}
    _, start = weights(api, workers[0], r0["weights"])
    for t in tasks:
        finish(api, t, compute_s=2.0)
    detail = tick(api)
    want, _ = expected_weights(
        start, [(decoded(start, 0, k), 0, 1.0) for k in (0, 1)], None, 1.0, 0.0
    )
    assert detail["rounds"][1]["weights"] == sha_of(want)
    assert detail["run"]["momentum"] is None  # warm-up leaves the outer momentum alone
    # adaptive H: round 1's target is the median time of round 0's replicas for H steps
    assert detail["rounds"][1]["target_s"] is None  # warm-up rounds set no target
    t1 = [t for t in (claim(api, w) for w in workers) if t is not None]
    assert [t.task["inner_steps"] for t in t1] == [4, 4]
    assert all(t.task["global_step"] == 1 and not t.task["warmup"] for t in t1 if t)
    _, start1 = weights(api, workers[0], detail["rounds"][1]["weights"])
    api.clock.advance(5)
    finish(api, t1[0], compute_s=2.0, inner_steps_done=4)
    # slow: stopped at half of H (its contribution record wins over its metrics)
    finish(api, t1[1], said={"compute_s": 3.0, "inner_steps_done": 2}, compute_s=9.0)
    detail = tick(api)
    assert detail["rounds"][2]["target_s"] == 4.0  # median of 2.0 and 3.0 x 4 / 2
    # the half-done replica weighs half (inner_steps_done / H)
    halves = [(decoded(start1, 1, 0), 0, 1.0), (decoded(start1, 1, 1), 0, 0.5)]
    want, _ = expected_weights(start1, halves, None, 0.7, 0.9)
    assert detail["rounds"][2]["weights"] == sha_of(want)
    assert detail["run"]["momentum"] is not None


def test_the_coordinator_measures_the_heldout_loss_itself(tmp_path: Path, clock: FakeClock) -> None:
    with serve(tmp_path, clock) as api:  # the real evaluation (inner.heldout_loss)
        _workers, tasks, _ = _round0(api, run_toml(replicas=1, min_quorum=1, rounds=1), hosts="a")
        finish(api, tasks[0], loss=0.0)  # what the worker claims is not what is recorded
        detail = tick(api)
        loss = detail["rounds"][0]["heldout_loss"]
        assert detail["run"]["state"] == "completed"
        assert isinstance(loss, float) and 1.0 < loss < 10.0
        assert (tmp_path / "runs" / "eval-cache").is_dir()


def test_the_app_opens_and_closes_rounds_by_itself(api: Api) -> None:
    api.reload(run_toml(replicas=2, min_quorum=2, rounds=2))
    opened = wait_until(lambda: run_detail(api)["rounds"], 20, "round 0 opened by the ticker")
    assert opened[0]["state"] == "open"
    workers = [api.register("cpu-a"), api.register("cpu-b")]
    for t in [claim(api, w) for w in workers]:
        assert t is not None
        finish(api, t)
    wait_until(lambda: run_detail(api)["run"]["round"] == 1, 20, "round 0 closed by the driver")


def test_a_lost_task_of_a_closed_round_is_cancelled_not_requeued(api: Api) -> None:
    # Slot 2's worker goes silent; the round closes on quorum without it. When the reaper
    # writes its attempt off, the task must not go back to pending: it would start from old
    # weights (and, claimed first by seq, hold up the open round).
    workers, tasks, _ = _round0(api, run_toml(rounds=3, min_quorum=2, straggler_wait=0.0))
    api.clock.advance(2)
    finish(api, tasks[0])
    finish(api, tasks[1])
    detail = tick(api)
    assert detail["rounds"][0]["state"] == "closed" and detail["run"]["round"] == 1
    api.clock.advance(11)  # past heartbeat_timeout_s: slot 2's attempt is lost
    api.reap()
    lost = api.coord.queue.get_job(tasks[2].job_id)
    assert lost.state == "cancelled"
    assert "round 0 of run dl has closed" in (lost.error or "") + " ".join(
        e.detail for e in api.coord.queue.events(lost.id)
    )
    # the next claim is a task of the open round
    nxt = claim(api, workers[0])
    assert nxt is not None and nxt.task["round"] == 1


def test_a_replicas_shard_hashes_are_checked_against_the_coordinators_plan(api: Api) -> None:
    _workers, tasks, _ = _round0(api, run_toml(min_quorum=3))
    from trainfleet.data.spec import dataset_digest

    job = api.coord.queue.get_job(tasks[0].job_id)
    assert job.spec.task is not None
    digest = dataset_digest(job.spec.task.dataset)
    # The coordinator plans the run's dataset at the first completion and judges the
    # replica's reported shard hashes against it: a made-up hash is flagged.
    data = {"digest": digest, "shards": [{"key": "train/0/0", "sha256": "0" * 64}]}
    done = finish(api, tasks[0], data_report=data)
    assert done["flags"], done
    events = " ".join(e.detail for e in api.coord.queue.events(tasks[0].job_id))
    assert "has no dataset" not in events
