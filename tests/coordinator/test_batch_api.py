"""The batch endpoints (``routes_batch``): claim, heartbeat and complete several jobs in one
request. A worker registered with ``slots = k`` holds at most k active jobs; each item of a
batch means what the single-job request means, and one bad item never spoils the others."""

from __future__ import annotations

from typing import Any

from test_api import OP, Api, Worker, assert_error, bearer

from fleetkit import make_cap

FIVE = (
    "\n".join(
        f'[[jobs]]\nname = "j{i}"\npriority = {p}\nhyper = {{ steps = 5 }}'
        for i, p in enumerate([0, 5, 0, 9, 5])
    )
    + '\n[[jobs]]\nname = "cuda-only"\npriority = 20\nrequire_cuda = true\nhyper = { steps = 5 }'
)


def register(api: Api, host: str = "cpu-a", slots: int | None = None, **cap: Any) -> Worker:
    capability = make_cap(host, **cap).model_dump(mode="json")
    token = api.coord.queue.enroll_host(host)
    body: dict[str, Any] = {"capability": capability}
    if slots is not None:
        body["slots"] = slots
    r = api.http.post("/v1/workers/register", json=body, headers=bearer(token))
    assert r.status_code == 200, r.text
    return Worker(r.json()["worker_id"], r.json()["token"], r.json())


def claims(api: Api, worker: Worker, max_jobs: int) -> list[dict[str, Any]]:
    r = api.http.post("/v1/claims", json={"max_jobs": max_jobs}, headers=worker.auth)
    assert r.status_code == 200, r.text
    return list(r.json()["claims"])


def beat_all(api: Api, worker: Worker, got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    beats = [{"job_id": c["job"]["id"], "epoch": c["epoch"]} for c in got]
    r = api.http.post("/v1/heartbeats", json={"beats": beats}, headers=worker.auth)
    assert r.status_code == 200, r.text
    return list(r.json()["replies"])


def test_batch_claim_respects_slots_capability_and_priority(api: Api) -> None:
    api.reload(FIVE)
    worker = register(api, slots=3)
    got = claims(api, worker, 10)
    # Three slots; the CUDA job is skipped (a CPU worker); priority order, then manifest order.
    assert [c["job"]["name"] for c in got] == ["j3", "j1", "j4"]
    assert all(c["epoch"] == 1 for c in got)
    # Asked again before any heartbeat (the reply was lost): the same claims, nothing new.
    again = claims(api, worker, 10)
    assert [(c["job"]["id"], c["epoch"]) for c in again] == [
        (c["job"]["id"], c["epoch"]) for c in got
    ]
    assert {r["outcome"] for r in beat_all(api, worker, got)} == {"ok"}
    # Every slot runs a job: nothing more, and the 409 names a held job.
    r = api.http.post("/v1/claims", json={"max_jobs": 2}, headers=worker.auth)
    body = assert_error(r, 409, "conflict")
    assert body["job_id"] in {c["job"]["id"] for c in got}
    # One completed: one slot free again, the next job in order.
    first = got[0]
    done = api.http.post(
        "/v1/completions",
        json={"results": [{"job_id": first["job"]["id"], "epoch": 1, "result": {}}]},
        headers=worker.auth,
    )
    assert done.json()["outcomes"][0]["outcome"] == "accepted"
    assert [c["job"]["name"] for c in claims(api, worker, 5)] == ["j0"]


def test_a_worker_without_slots_holds_one_job(api: Api) -> None:
    api.reload(FIVE)
    worker = register(api)
    got = claims(api, worker, 5)
    assert [c["job"]["name"] for c in got] == ["j3"]
    gpu = register(api, "gpu-a", slots=2, cuda=True, vram_gib=16)
    assert [c["job"]["name"] for c in claims(api, gpu, 2)] == ["cuda-only", "j1"]


def test_batch_completion_reports_each_item(api: Api) -> None:
    api.reload(FIVE)
    worker = register(api, slots=3)
    got = claims(api, worker, 3)
    beat_all(api, worker, got)
    stale = got[1]["job"]["id"]
    r = api.http.post(f"/v1/jobs/{stale}/requeue", headers=OP)  # the attempt is written off
    assert r.status_code == 200, r.text
    results = [{"job_id": c["job"]["id"], "epoch": c["epoch"], "result": {}} for c in got]
    results.append({"job_id": "f" * 64, "epoch": 1, "result": {}})  # no such job
    results.append({"job_id": got[2]["job"]["id"], "epoch": 1, "result": {"metrics": 3}})
    results.append({"job_id": got[2]["job"]["id"], "epoch": 1, "result": {"artifact": "0" * 64}})
    r = api.http.post("/v1/completions", json={"results": results}, headers=worker.auth)
    assert r.status_code == 200, r.text
    outcomes = r.json()["outcomes"]
    assert [o["outcome"] for o in outcomes] == [
        "accepted",
        "fenced",
        "accepted",
        "refused",
        "refused",
        "refused",
    ]
    assert "not uploaded" in outcomes[5]["detail"]
    assert "stale" in outcomes[1]["detail"]
    assert outcomes[0]["state"] == "completed"
    assert api.coord.queue.get_job(got[0]["job"]["id"]).state == "completed"
    assert api.coord.queue.get_job(stale).state == "pending"


def test_batch_heartbeat_replies_per_beat(api: Api) -> None:
    api.reload(FIVE)
    worker = register(api, slots=2)
    got = claims(api, worker, 2)
    beats = [{"job_id": c["job"]["id"], "epoch": c["epoch"]} for c in got]
    beats.append({"job_id": got[0]["job"]["id"], "epoch": 7})  # not this claim's epoch
    r = api.http.post("/v1/heartbeats", json={"beats": beats}, headers=worker.auth)
    assert r.status_code == 200, r.text
    replies = r.json()["replies"]
    assert [x["outcome"] for x in replies] == ["ok", "ok", "fenced"]
    assert replies[0]["state"] == "running" and replies[0]["cancel"] is False
    assert replies[0]["heartbeat_interval_s"] > 0
    # The beats were answered from memory; a read through the API writes them first.
    r = api.http.get(f"/v1/jobs/{got[1]['job']['id']}", headers=OP)
    assert r.json()["job"]["state"] == "running"
    assert api.coord.queue.get_job(got[1]["job"]["id"]).state == "running"


def test_batches_are_bounded(api: Api) -> None:
    """Over 64 items is a 400 naming the bound, refused by the body's model before any item is
    read (tests/coordinator/test_scale_attacks.py times nothing but checks the order)."""
    worker = register(api, slots=2)
    r = api.http.post("/v1/claims", json={"max_jobs": 65}, headers=worker.auth)
    assert "64" in assert_error(r, 400, "bad_request")["message"]
    beats = [{"job_id": f"j{i}", "epoch": 1} for i in range(65)]
    r = api.http.post("/v1/heartbeats", json={"beats": beats}, headers=worker.auth)
    assert "64" in assert_error(r, 400, "bad_request")["message"]
    results = [{"job_id": f"j{i}", "epoch": 1, "result": {}} for i in range(65)]
    r = api.http.post("/v1/completions", json={"results": results}, headers=worker.auth)
    assert "64" in assert_error(r, 400, "bad_request")["message"]
    # 64 is fine; malformed items are a 400 with a JSON body.
    r = api.http.post("/v1/heartbeats", json={"beats": beats[:64]}, headers=worker.auth)
    assert r.status_code == 200 and len(r.json()["replies"]) == 64
    r = api.http.post("/v1/claims", json={"max_jobs": 0}, headers=worker.auth)
    assert_error(r, 400, "bad_request")
    r = api.http.post("/v1/completions", json={"results": [{"job_id": "x"}]}, headers=worker.auth)
    assert_error(r, 400, "bad_request")
    token = api.coord.queue.enroll_host("cpu-b")
    cap = make_cap("cpu-b").model_dump(mode="json")
    r = api.http.post(
        "/v1/workers/register", json={"capability": cap, "slots": 65}, headers=bearer(token)
    )
    assert_error(r, 400, "bad_request")
