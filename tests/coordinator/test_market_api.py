"""The market's HTTP API, served in-process: models, competitions, submissions refereed by
scripted referee workers (real losses from ``verify.referee.referee_eval``), the ledger.

The referees here are workers registered through the API that claim their referee jobs,
download both models through ``GET /v1/market/models/{sha256}``, evaluate them in-process
and complete with the loss arrays, as ``trainfleet join`` does (the live version is
``tests/e2e/test_market_e2e.py``).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save as save_bytes
from test_api import JOIN_TOKEN, OP, OP_TOKEN, Api, TestClient, Worker, assert_error, bearer

from fleetkit import FakeClock
from tinymarket import baseline, competition, heldout_mean, misfit, trained
from trainfleet.artifacts import ArtifactStore
from trainfleet.artifacts.gc import collect_garbage
from trainfleet.coordinator.app import create_app
from trainfleet.coordinator.state import Coordinator
from trainfleet.data.prepare import CacheSettings
from trainfleet.queue import JobQueue
from trainfleet.verify.referee import referee_eval
from trainfleet.verify.spec import RefereeTask

HONEST_STEPS = 60


def model_bytes(weights: Any) -> bytes:
    return save_bytes({k: weights[k].contiguous() for k in sorted(weights)})


def put_model(api: Api, data: bytes, headers: dict[str, str], **query: Any) -> Any:
    sha = query.pop("sha", hashlib.sha256(data).hexdigest())
    params = {"size": len(data), **query}
    return api.http.put(f"/v1/market/models/{sha}", content=data, params=params, headers=headers)


def upload(api: Api, weights: Any, headers: dict[str, str] = OP) -> str:
    r = put_model(api, model_bytes(weights), headers)
    assert r.status_code == 200, r.text
    return str(r.json()["sha256"])


def create(api: Api, name: str = "tiny-lm", **terms: Any) -> dict[str, Any]:
    sha = upload(api, baseline())
    r = api.http.post(
        "/v1/market/competitions",
        json={"spec": competition(name, **terms), "baseline": sha},
        headers=OP,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def host_token(api: Api, host: str) -> dict[str, str]:
    """The join token of enrolled ``host`` (a producer needs no worker)."""
    if host not in api._join_tokens:
        api._join_tokens[host] = api.coord.queue.enroll_host(host)
    return bearer(api._join_tokens[host])


def submit(api: Api, weights: Any, claim: float, producer: str = "alice") -> Any:
    headers = host_token(api, producer)
    sha = upload(api, weights, headers)
    return api.http.post(
        "/v1/market/competitions/tiny-lm/submissions",
        json={"sha256": sha, "claim": claim},
        headers=headers,
    )


def referee(api: Api, worker: Worker, tmp: Path, *, honest: bool = True) -> dict[str, Any]:
    """Claim one referee job as ``worker``, fetch both models, evaluate, complete; the reply.
    ``honest=False`` reports the candidate's losses for both models (a lazy referee)."""
    claim = api.claim(worker)
    job, epoch = claim["job"], claim["epoch"]
    assert job["spec"]["kind"] == "referee"
    task = RefereeTask.model_validate(job["spec"]["task"])
    paths = {}
    for what in ("candidate", "frontier"):
        sha = getattr(task, what)
        r = api.http.get(f"/v1/market/models/{sha}", headers=worker.auth)
        assert r.status_code == 200, r.text
        assert hashlib.sha256(r.content).hexdigest() == sha
        paths[what] = tmp / f"{worker.id}-{what}.safetensors"
        paths[what].write_bytes(r.content)
    metrics = referee_eval(task, paths["candidate"], paths["frontier"], CacheSettings(None))
    if not honest:
        metrics["frontier_losses"] = metrics["candidate_losses"]
    r = api.http.post(
        f"/v1/jobs/{job['id']}/complete",
        json={"epoch": epoch, "result": {"referee": metrics}},
        headers=worker.auth,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def submission(api: Api, sid: str) -> dict[str, Any]:
    r = api.http.get(f"/v1/market/submissions/{sid}", headers=OP)
    assert r.status_code == 200, r.text
    return dict(r.json())


def ledger(api: Api) -> dict[str, Any]:
    r = api.http.get("/v1/market/ledger", headers=OP)
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.fixture
def api(tmp_path: Path, clock: FakeClock, make_queue: Callable[..., JobQueue]) -> Iterator[Api]:
    """The app in-process (``test_api.serve``) on each queue backend: SQLite, PostgreSQL."""
    coord = Coordinator(
        queue=make_queue(),
        store=ArtifactStore(tmp_path / "artifacts"),
        staging_dir=tmp_path / "staging",
        operator_token=OP_TOKEN,
        join_token=JOIN_TOKEN,
    )
    with TestClient(create_app(coord)) as http:
        served = Api(http, coord, clock, tmp_path)
        try:
            yield served
        finally:
            served.close()


@pytest.fixture(autouse=True)
def fixed_ids(api: Api) -> None:
    """Submission ids (and so the referees' subsets) the same on every run."""
    ids = itertools.count(1)
    api.coord.market.new_id = lambda: f"{next(ids):032x}"


@pytest.fixture
def referees(api: Api) -> list[Worker]:
    return [api.register(host) for host in ("ref-a", "ref-b", "ref-c")]


def test_an_honest_improvement_is_paid_once_and_moves_the_frontier(
    api: Api, referees: list[Worker], tmp_path: Path
) -> None:
    comp = create(api)
    assert comp["frontier"] == comp["baseline"] and math.isfinite(comp["baseline_score"])
    better = trained(HONEST_STEPS)
    r = submit(api, better, heldout_mean(better))
    assert r.status_code == 200, r.text
    sub = r.json()
    assert (sub["state"], sub["producer"], sub["seq"]) == ("refereeing", "alice", 1)
    jobs = submission(api, sub["id"])["referees"]
    assert len(jobs) == 3 and {j["state"] for j in jobs} == {"pending"}

    for worker in referees:
        referee(api, worker, tmp_path)

    done = submission(api, sub["id"])
    decided = done["submission"]
    assert decided["state"] == "accepted", decided["verdict"]
    reports = decided["reports"]
    assert sorted(r["index"] for r in reports) == [0, 1, 2]
    assert {r["host"] for r in reports} == {"ref-a", "ref-b", "ref-c"} and all(
        r["ok"] and r["certified"] for r in reports
    )
    improvement = decided["improvement"]
    assert improvement > 0 and decided["paid"] == pytest.approx(100.0 * improvement)
    assert decided["trusted_score"] == pytest.approx(comp["baseline_score"] - improvement)

    after = api.http.get("/v1/market/competitions/tiny-lm", headers=OP).json()
    assert after["competition"]["frontier"] == decided["sha256"]
    assert after["competition"]["frontier_score"] == pytest.approx(decided["trusted_score"])
    assert after["balances"] == {"alice": pytest.approx(decided["paid"])}
    book = ledger(api)
    assert [(e["submission_id"], e["account"]) for e in book["entries"]] == [(sub["id"], "alice")]
    assert book["total_paid"] == pytest.approx(
        100.0 * (comp["baseline_score"] - after["competition"]["frontier_score"])
    )
    board = api.http.get("/v1/market/competitions/tiny-lm/leaderboard", headers=OP).json()
    assert [e["id"] for e in board["entries"]] == [sub["id"]]

    api.coord.market.tick()  # settling again (a restart's first tick) pays nothing more
    assert ledger(api)["entries"] == book["entries"]

    again = submit(api, better, heldout_mean(better), producer="bob")  # a free rider
    assert again.status_code == 200, again.text
    dup = again.json()
    assert dup["state"] == "duplicate" and dup["paid"] == 0 and "pays nothing" in dup["verdict"]
    assert submission(api, dup["id"])["referees"] == []
    frontier = submit(api, baseline(), 1.0, producer="bob").json()  # the baseline itself
    assert frontier["state"] == "duplicate"
    assert ledger(api)["entries"] == book["entries"]


def test_an_inflated_claim_is_rejected_and_paid_nothing(
    api: Api, referees: list[Worker], tmp_path: Path
) -> None:
    create(api)
    better = trained(HONEST_STEPS)
    sub = submit(api, better, heldout_mean(better) - 0.5).json()  # claims 0.5 nats too good
    for worker in referees:
        referee(api, worker, tmp_path)

    decided = submission(api, sub["id"])["submission"]
    assert decided["state"] == "rejected" and decided["paid"] == 0
    assert "inflated claim" in decided["verdict"]
    assert all(r["ok"] for r in decided["reports"])  # the referees measured; the claim lied
    assert ledger(api)["entries"] == []
    comp = api.http.get("/v1/market/competitions/tiny-lm", headers=OP).json()["competition"]
    assert comp["frontier"] == comp["baseline"]


def test_a_model_that_does_not_fit_the_family_is_refused_before_any_referee(
    api: Api, referees: list[Worker]
) -> None:
    create(api)
    before = len(api.coord.queue.list_jobs())
    r = submit(api, misfit(), 2.0)
    body = assert_error(r, 400, "bad_request")
    assert "does not fit competition tiny-lm's family" in body["message"]
    junk = b"not a safetensors file at all"
    headers = host_token(api, "alice")
    assert put_model(api, junk, headers).status_code == 200
    r = api.http.post(
        "/v1/market/competitions/tiny-lm/submissions",
        json={"sha256": hashlib.sha256(junk).hexdigest(), "claim": 2.0},
        headers=headers,
    )
    assert "not a safetensors file" in assert_error(r, 400, "bad_request")["message"]
    nan = {k: v.clone() for k, v in baseline().items()}
    next(iter(nan.values())).view(-1)[0] = math.nan
    assert "non-finite" in assert_error(submit(api, nan, 2.0), 400, "bad_request")["message"]
    assert len(api.coord.queue.list_jobs()) == before
    assert api.http.get("/v1/market/competitions/tiny-lm", headers=OP).json()["submissions"] == []


def test_models_reach_only_a_worker_holding_a_referee_job_that_names_them(
    api: Api, referees: list[Worker], tmp_path: Path
) -> None:
    comp = create(api)
    sub = submit(api, trained(5), 3.0).json()
    outsider = api.register("ref-d")
    for sha in (sub["sha256"], comp["baseline"]):
        r = api.http.get(f"/v1/market/models/{sha}", headers=outsider.auth)
        assert_error(r, 403, "forbidden")
    api.claim(referees[0])
    r = api.http.get(f"/v1/market/models/{sub['sha256']}", headers=referees[0].auth)
    assert r.status_code == 200 and r.content == (api.coord.store.read_bytes(sub["sha256"]))
    assert_error(
        api.http.get(f"/v1/market/models/{sub['sha256']}", headers=OP), 401, "unauthorized"
    )


def test_uploads_and_submissions_are_bounded_and_authenticated(api: Api) -> None:
    create(api)
    data = model_bytes(trained(3))
    alice = host_token(api, "alice")
    assert_error(put_model(api, data, alice, sha="0" * 64), 422, "integrity_error")
    assert_error(put_model(api, data, alice, size=1 << 40), 413, "payload_too_large")
    assert_error(put_model(api, data, {}), 401, "unauthorized")
    assert_error(put_model(api, data, bearer("join-token")), 401, "unauthorized")
    ok = put_model(api, data, alice)
    assert ok.json() == {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "stored": True,
    }
    assert put_model(api, data, alice).json()["stored"] is False  # content addressed
    sha = ok.json()["sha256"]
    url = "/v1/market/competitions/tiny-lm/submissions"
    worker = api.register("ref-a")
    for headers in ({}, bearer("join-token"), worker.auth):  # a worker credential is no submitter
        assert_error(
            api.http.post(url, json={"sha256": sha, "claim": 2.0}, headers=headers),
            401,
            "unauthorized",
        )
    bad_bodies = [
        {"sha256": sha},
        {"sha256": "x", "claim": 2.0},
        {"sha256": sha, "claim": -1},
        {"sha256": sha, "claim": 2.0, "extra": 1},
        {"sha256": sha, "claim": "NaN"},
    ]
    for body in bad_bodies:
        assert_error(api.http.post(url, json=body, headers=alice), 400, "bad_request")
    r = api.http.post(
        "/v1/market/competitions/nope/submissions",
        json={"sha256": sha, "claim": 2.0},
        headers=alice,
    )
    assert_error(r, 404, "not_found")
    r = api.http.post(url, json={"sha256": "ab" * 32, "claim": 2.0}, headers=alice)
    assert "upload it first" in assert_error(r, 404, "not_found")["message"]
    by_operator = api.http.post(url, json={"sha256": sha, "claim": 2.0}, headers=OP)
    assert by_operator.json()["producer"] == "operator"


def test_creating_a_competition_refuses_bad_terms_a_bad_baseline_and_a_taken_name(
    api: Api,
) -> None:
    create(api)
    sha = upload(api, baseline())
    url = "/v1/market/competitions"
    r = api.http.post(url, json={"spec": competition(), "baseline": sha}, headers=OP)
    assert_error(r, 409, "conflict")
    bad_terms = {**competition("other"), "quorum": 4}
    r = api.http.post(url, json={"spec": bad_terms, "baseline": sha}, headers=OP)
    assert_error(r, 400, "bad_request")
    r = api.http.post(
        url, json={"spec": competition("other"), "baseline": upload(api, misfit())}, headers=OP
    )
    assert "does not fit" in assert_error(r, 400, "bad_request")["message"]
    alice = host_token(api, "alice")
    r = api.http.post(url, json={"spec": competition("other"), "baseline": sha}, headers=alice)
    assert_error(r, 401, "unauthorized")
    names = [c["name"] for c in api.http.get(url, headers=OP).json()["competitions"]]
    assert names == ["tiny-lm"]


def test_a_referee_result_that_is_not_two_loss_lists_is_refused(
    api: Api, referees: list[Worker]
) -> None:
    create(api)
    submit(api, trained(5), 3.0)
    claim = api.claim(referees[0])
    url = f"/v1/jobs/{claim['job']['id']}/complete"
    for bad in (
        {"referee": [1.0]},
        {"referee": {"candidate_losses": [1.0, "x"], "frontier_losses": [1.0, 2.0]}},
        {"referee": {"candidate_losses": [1.0], "frontier_losses": [1.0, 2.0]}},
        {"referee": {"candidate_losses": [1.0] * 5000, "frontier_losses": [1.0] * 5000}},
    ):
        r = api.http.post(
            url, json={"epoch": claim["epoch"], "result": bad}, headers=referees[0].auth
        )
        assert_error(r, 400, "bad_request")
    assert api.job(claim["job"]["id"])["job"]["state"] in ("claimed", "running")


def test_lazy_or_failed_referees_cannot_make_a_quorum(
    api: Api, referees: list[Worker], tmp_path: Path
) -> None:
    create(api)
    better = trained(HONEST_STEPS)
    sub = submit(api, better, heldout_mean(better)).json()
    referee(api, referees[0], tmp_path)
    referee(api, referees[1], tmp_path, honest=False)  # frontier = candidate: certifies nothing
    claim = api.claim(referees[2])
    for _ in range(2):  # max_failures: the job fails for good
        r = api.http.post(
            f"/v1/jobs/{claim['job']['id']}/fail",
            json={"epoch": claim["epoch"], "error": "out of memory"},
            headers=referees[2].auth,
        )
        assert r.status_code == 200, r.text
        if r.json()["state"] == "pending":
            claim = api.claim(referees[2])
    api.coord.market.tick()
    decided = submission(api, sub["id"])["submission"]
    assert decided["state"] == "accepted", decided  # the claim is inside 2 of 3 intervals
    assert decided["paid"] == 0  # but only one referee certified an improvement
    failed = next(r for r in decided["reports"] if not r["ok"])
    assert "out of memory" in failed["reason"]
    assert ledger(api)["entries"] == []


def test_the_artifact_gc_keeps_every_model_the_market_names(api: Api) -> None:
    comp = create(api)
    sub = submit(api, trained(5), 3.0).json()
    stray = upload(api, trained(3))  # uploaded, never submitted: the GC may take it
    removed = collect_garbage(api.coord.store, api.coord.queue, grace_s=-1)
    assert removed == [stray]
    for sha in (comp["baseline"], sub["sha256"]):
        assert api.coord.store.exists(sha)


def test_a_panel_completed_behind_the_drivers_back_is_decided_by_the_next_tick(
    api: Api, referees: list[Worker], tmp_path: Path
) -> None:
    """As after a coordinator died between the referees' completions and the decision: the
    stored results alone decide the submission, once."""
    create(api)
    better = trained(HONEST_STEPS)
    sub = submit(api, better, heldout_mean(better)).json()
    for worker in referees:
        claim = api.claim(worker)
        task = RefereeTask.model_validate(claim["job"]["spec"]["task"])
        paths = [tmp_path / f"{worker.id}-{w}.safetensors" for w in ("c", "f")]
        for path, sha in zip(paths, (task.candidate, task.frontier), strict=True):
            path.write_bytes(api.coord.store.read_bytes(sha))
        losses = referee_eval(task, *paths, CacheSettings(None))
        api.coord.queue.complete(claim["job"]["id"], worker.id, claim["epoch"], {"referee": losses})
    api.coord.market.tick()  # (or the app's own ticker got there first)
    decided = submission(api, sub["id"])["submission"]
    assert decided["state"] == "accepted" and decided["paid"] > 0
    api.coord.market.tick()
    assert [e["submission_id"] for e in ledger(api)["entries"]] == [sub["id"]]


def test_who_competes_reads_the_terms_the_leaderboard_and_the_ledger(api: Api) -> None:
    create(api)
    alice = host_token(api, "alice")
    worker = api.register("ref-a")
    reads = [
        "/v1/market/competitions",
        "/v1/market/competitions/tiny-lm",
        "/v1/market/competitions/tiny-lm/leaderboard",
        "/v1/market/ledger",
    ]
    for path in reads:
        for headers in (OP, alice):
            assert api.http.get(path, headers=headers).status_code == 200, path
        for headers in ({}, bearer("join-token"), worker.auth):  # no market caller
            assert_error(api.http.get(path, headers=headers), 401, "unauthorized")
    terms = api.http.get("/v1/market/competitions/tiny-lm", headers=alice).json()
    assert terms["competition"]["spec"]["hyper"]["d_model"] == competition()["hyper"]["d_model"]
