"""``POST /v1/jobs`` (submit one job) and dependencies through the in-process API: the reply,
the refusals as 4xx JSON, the leader's dependency step in the app's lifespan, and a reload
that would close a cycle through a submitted job."""

from __future__ import annotations

from typing import Any

import pytest
from test_api import OP, Api, assert_error

from trainfleet.errors import BadRequest, Conflict
from trainfleet.testing import wait_until

MANIFEST = """
[[jobs]]
name = "a"
kind = "command"
command = ["true"]
"""


def job_text(name: str, *after: str, arg: str = "x") -> str:
    after_list = ", ".join(f'"{n}"' for n in after)
    return (
        f'[[jobs]]\nname = "{name}"\nkind = "command"\ncommand = ["echo", "{arg}"]\n'
        f"after = [{after_list}]\n"
    )


def submit(api: Api, text: str, **body: Any) -> Any:
    return api.http.post("/v1/jobs", json={"text": text, **body}, headers=OP)


def test_a_submitted_job_waits_and_is_released_by_the_leader(api: Api) -> None:
    api.reload(MANIFEST)
    r = submit(api, job_text("b", "a"), path="b.toml")
    assert r.status_code == 201, r.text
    job = r.json()
    assert (job["name"], job["state"], job["in_manifest"], job["pinned"], job["submitted"]) == (
        "b",
        "waiting",
        False,
        True,
        True,
    )
    explained = api.http.get("/v1/jobs/b/explain", headers=OP).json()["message"]
    assert explained.splitlines()[0] == "waiting for a (pending)"
    listed = api.http.get("/v1/jobs", params={"state": "waiting"}, headers=OP).json()["jobs"]
    assert [j["name"] for j in listed] == ["b"]
    assert api.http.get("/v1/status", headers=OP).json()["counts"] == {"pending": 1, "waiting": 1}

    worker = api.register()
    claim = api.claim(worker)
    assert claim["job"]["name"] == "a"
    r = api.http.post(
        f"/v1/jobs/{claim['job']['id']}/complete",
        json={"epoch": claim["epoch"], "result": {}},
        headers=worker.auth,
    )
    assert r.status_code == 200, r.text
    # The lifespan's dependency step (every 0.5 s, on the leader) releases b.
    wait_until(lambda: api.job("b")["job"]["state"] == "pending", 30, "b released")
    assert api.claim(worker)["job"]["name"] == "b"

    # A reload keeps the submitted job.
    plan = api.reload(MANIFEST)
    assert plan["removed"] == [] and api.job("b")["job"]["state"] == "claimed"


def test_the_client_submits_and_maps_refusals(api: Api) -> None:
    api.reload(MANIFEST)
    client = api.client("op-token")
    job = client.add_job(job_text("b", "a"), "b.toml")
    assert job["state"] == "waiting"
    with pytest.raises(Conflict, match="the name 'b' is held by an unfinished job"):
        client.add_job(job_text("b", "a", arg="other"), "b.toml")
    with pytest.raises(Conflict, match="the queue already holds this job"):
        client.add_job(job_text("b", "a"), "b.toml")
    with pytest.raises(BadRequest, match="after: no job named 'ghost'"):
        client.add_job(job_text("c", "ghost"), "c.toml")


@pytest.mark.parametrize(
    ("body", "status", "code", "needle"),
    [
        ({"text": "[[jobs]\nname = 1"}, 400, "bad_request", "not valid TOML"),
        ({"text": ""}, 400, "bad_request", "holds 0 [[jobs]] tables"),
        ({"text": job_text("x") + job_text("y")}, 400, "bad_request", "holds 2 [[jobs]]"),
        ({"text": "[hosts.h1]\n" + job_text("x")}, 400, "bad_request", "not hosts"),
        ({"text": job_text("x", "x")}, 400, "bad_request", "cannot wait for itself"),
        ({"text": job_text("x").replace("kind", "knd")}, 400, "bad_request", "invalid job"),
        ({"text": "a = " + "[" * 40 + "]" * 40}, 400, "bad_request", "nests deeper"),
        ({"text": job_text("x"), "dry_run": True}, 400, "bad_request", "invalid request body"),
        ({"path": "x.toml"}, 400, "bad_request", "invalid request body"),
        ({"text": 5}, 400, "bad_request", "invalid request body"),
        ({"text": job_text("a")}, 409, "conflict", "held by a manifest job"),
        # [fair_share] is the manifest's: refused, not silently dropped
        (
            {"text": "[fair_share]\nhalf_life_h = 1\n" + job_text("x")},
            400,
            "bad_request",
            "fair_share",
        ),
        # values a JSON column cannot hold back: stored, they made every read of the job fail
        ({"text": job_text("x") + "hyper = { lr = nan }\n"}, 400, "bad_request", "finite number"),
        ({"text": job_text("x") + "timeout_s = inf\n"}, 400, "bad_request", "finite number"),
        ({"text": job_text("x") + "min_ram_gib = inf\n"}, 400, "bad_request", "finite number"),
        # integers past SQLite's 64 bits: the insert raised OverflowError (a 500)
        ({"text": job_text("x") + f"priority = {2**70}\n"}, 400, "bad_request", "less than"),
        ({"text": job_text("x") + f"priority = {-(2**70)}\n"}, 400, "bad_request", "greater than"),
        ({"text": job_text("x") + f"min_cores = {2**63}\n"}, 400, "bad_request", "less than"),
    ],
)
def test_malformed_or_refused_submits_get_4xx_json(
    api: Api, body: dict[str, Any], status: int, code: str, needle: str
) -> None:
    api.reload(MANIFEST)
    r = api.http.post("/v1/jobs", json=body, headers=OP)
    got = assert_error(r, status, code)
    assert needle in got["message"] + str(got.get("problems", ""))
    assert [j["name"] for j in api.http.get("/v1/jobs", headers=OP).json()["jobs"]] == ["a"]


def test_submit_needs_the_operator_token(api: Api) -> None:
    assert_error(api.http.post("/v1/jobs", json={"text": job_text("x")}), 401, "unauthorized")
    r = api.http.post("/v1/jobs", content=b"{not json", headers=OP)
    assert_error(r, 400, "bad_request")


def test_a_reload_closing_a_cycle_through_a_submitted_job_is_refused(api: Api) -> None:
    api.reload(MANIFEST)
    assert submit(api, job_text("s", "a")).status_code == 201
    cyclic = MANIFEST + 'after = ["s"]\n'
    r = api.http.post("/v1/manifest", json={"text": cyclic}, headers=OP)
    body = assert_error(r, 400, "bad_request")
    assert any("dependency cycle a -> s -> a" in p for p in body["problems"])
    assert api.job("a")["job"]["spec"]["after"] == []
    # Naming the submitted job without a cycle is fine.
    named = MANIFEST + job_text("t", "s")
    assert api.reload(named)["added"][0]["name"] == "t"


def test_the_openapi_document_says_201() -> None:
    from trainfleet.coordinator.app import api_routes

    op = api_routes().openapi("test")["paths"]["/v1/jobs"]["post"]
    assert "201" in op["responses"] and "200" not in op["responses"]
    assert {"400", "401", "409"} <= set(op["responses"])
