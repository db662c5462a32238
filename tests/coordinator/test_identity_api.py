"""Fleet identity over the HTTP API, in-process: per-host enrollment, open mode, revocation,
rotation, read auth, and the capability's string policy (a 400 with a JSON body)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_api import JOIN, OP, Api, assert_error, bearer, serve

from fleetkit import FakeClock, make_cap
from trainfleet.coordinator.server import ServeConfig, build_coordinator, ensure_token

POLICY_AND_PINNED_JOB = """
[hosts.gpu-box]
cores = 2

[[jobs]]
name = "pinned"
allowed_hosts = ["gpu-box"]
hyper = { steps = 5 }
"""

ONE_JOB = """
[[jobs]]
name = "solo"
hyper = { steps = 5 }
"""


@pytest.fixture
def api(tmp_path: Path, clock: FakeClock) -> Iterator[Api]:
    with serve(tmp_path, clock) as a:
        yield a


def register(api: Api, token: str, host: str, hostname: str | None = None) -> Any:
    cap = make_cap(host).model_copy(update={"hostname": hostname or host})
    body = {"capability": cap.model_dump(mode="json")}
    return api.http.post("/v1/workers/register", json=body, headers=bearer(token))


def enroll(api: Api, name: str) -> str:
    r = api.http.post(f"/v1/hosts/{name}/enroll", headers=OP)
    assert r.status_code == 200, r.text
    assert r.json()["host"] == name
    return str(r.json()["token"])


def test_an_enrolled_token_makes_its_worker_that_host_whatever_it_claims(api: Api) -> None:
    token = enroll(api, "gpu-box")
    # No --host given: the worker reports its hostname; it is registered as gpu-box.
    r = register(api, token, host="laptop", hostname="laptop")
    assert r.status_code == 200, r.text
    assert r.json()["effective"]["host"] == "gpu-box"
    assert r.json()["worker_id"].startswith("gpu-box-")
    # An explicit, different --host is refused, and says which host the token is for.
    r = register(api, token, host="other-box", hostname="laptop")
    body = assert_error(r, 403, "forbidden")
    assert "this token is enrolled for host gpu-box" in body["message"]
    hosts = api.http.get("/v1/hosts", headers=OP).json()["hosts"]
    assert [(h["name"], h["state"], h["workers_online"]) for h in hosts] == [
        ("gpu-box", "active", 1)
    ]
    assert token not in json.dumps(hosts)  # tokens are never listed
    assert_error(api.http.post("/v1/hosts/gpu-box/enroll", headers=OP), 409, "conflict")


def test_host_endpoints_need_the_operator_token_and_a_valid_name(api: Api) -> None:
    token = enroll(api, "cpu-a")
    for headers in ({}, JOIN, bearer(token)):
        assert_error(api.http.post("/v1/hosts/x/enroll", headers=headers), 401, "unauthorized")
        assert_error(api.http.get("/v1/hosts", headers=headers), 401, "unauthorized")
    for bad in ("-lead", "a" * 64, "bad%20name", "open:x"):
        r = api.http.post(f"/v1/hosts/{bad}/enroll", headers=OP)
        assert r.status_code in (400, 404), r.text  # 404: no such path, for the pattern
        assert r.headers["content-type"].startswith("application/json")


def test_the_shared_token_is_refused_outside_open_mode(api: Api) -> None:
    body = assert_error(register(api, "join-token", "cpu-a"), 401, "unauthorized")
    assert "shared join token is refused" in body["message"]
    assert "--open-join" in body["message"]
    body = assert_error(register(api, "op-token", "cpu-a"), 401, "unauthorized")
    assert "operator token does not register" in body["message"]
    assert api.coord.queue.list_workers() == []


def test_open_mode_admits_anyone_as_a_new_policy_less_host(
    tmp_path: Path, clock: FakeClock
) -> None:
    with serve(tmp_path, clock, open_join=True) as api:
        api.reload(POLICY_AND_PINNED_JOB)
        r = register(api, "join-token", "gpu-box")  # claims a host with a policy
        assert r.status_code == 200, r.text
        reg = r.json()
        assert reg["effective"]["host"] == "open:gpu-box"
        assert reg["effective"]["cores"] == 4 and reg["notes"] == []  # no policy applied
        claim = api.http.post("/v1/workers/claim", headers=bearer(reg["token"]))
        assert claim.status_code == 200 and claim.json()["claim"] is None  # not gpu-box
        # Giving the assigned name itself changes nothing: the same label, its own worker.
        again = register(api, "join-token", "open:gpu-box").json()
        assert again["effective"]["host"] == "open:gpu-box"
        assert again["worker_id"] != reg["worker_id"] and again["token"] != reg["token"]
        claim = api.http.post("/v1/workers/claim", headers=bearer(again["token"]))
        assert claim.json()["claim"] is None
        # Enrolled tokens keep working in open mode.
        enrolled = register(api, enroll(api, "gpu-box"), "gpu-box").json()
        assert enrolled["effective"]["cores"] == 2  # the policy applies to the real one
        claim = api.http.post("/v1/workers/claim", headers=bearer(enrolled["token"]))
        assert claim.json()["claim"]["job"]["name"] == "pinned"
        # An open host is revoked by its assigned name (URL-quoted by the client).
        assert api.client("op-token").revoke_host("open:gpu-box")["revoked"] == "open:gpu-box"
        stale = api.http.post("/v1/workers/claim", headers=bearer(reg["token"]))
        assert_error(stale, 401, "unauthorized")


def test_revoking_a_worker_refuses_its_next_request_and_requeues_its_job(api: Api) -> None:
    api.reload(ONE_JOB)
    token = enroll(api, "cpu-a")
    reg = register(api, token, "cpu-a").json()
    worker = bearer(reg["token"])
    claim = api.http.post("/v1/workers/claim", headers=worker).json()["claim"]
    job_id = claim["job"]["id"]
    r = api.http.post(f"/v1/workers/{reg['worker_id']}/revoke", headers=OP)
    assert r.status_code == 200, r.text
    assert [j["name"] for j in r.json()["requeued"]] == ["solo"]
    job = api.job(job_id)
    assert job["job"]["state"] == "pending" and job["job"]["epoch"] == claim["epoch"] + 1
    revoked = [e for e in job["events"] if e["kind"] == "revoked"]
    assert revoked and "revoked" in revoked[0]["detail"]
    beat = api.http.post(f"/v1/jobs/{job_id}/heartbeat", json={"epoch": 1}, headers=worker)
    assert "revoked" in assert_error(beat, 401, "unauthorized")["message"]
    assert_error(api.http.post("/v1/workers/claim", headers=worker), 401, "unauthorized")
    # Revoking one worker leaves its host enrolled: the daemon may register again.
    assert register(api, token, "cpu-a").status_code == 200
    assert_error(api.http.post("/v1/workers/nobody/revoke", headers=OP), 404, "not_found")


def test_revoking_a_host_revokes_its_token_and_every_worker(api: Api) -> None:
    api.reload(ONE_JOB)
    token = enroll(api, "cpu-a")
    first, second = (bearer(register(api, token, "cpu-a").json()["token"]) for _ in range(2))
    api.http.post("/v1/workers/claim", headers=first)
    r = api.http.post("/v1/hosts/cpu-a/revoke", headers=OP)
    assert r.status_code == 200 and [j["name"] for j in r.json()["requeued"]] == ["solo"]
    for worker in (first, second):
        assert_error(api.http.post("/v1/workers/claim", headers=worker), 401, "unauthorized")
    body = assert_error(register(api, token, "cpu-a"), 401, "unauthorized")
    assert "revoked" in body["message"]
    hosts = api.http.get("/v1/hosts", headers=OP).json()["hosts"]
    assert hosts[0]["state"] == "revoked"
    # Enrolling it again issues a fresh token; the revoked one stays refused.
    fresh = enroll(api, "cpu-a")
    assert register(api, fresh, "cpu-a").status_code == 200
    assert_error(register(api, token, "cpu-a"), 401, "unauthorized")


def test_rotation_replaces_the_token_and_optionally_the_workers(api: Api) -> None:
    old = enroll(api, "cpu-a")
    running = bearer(register(api, old, "cpu-a").json()["token"])
    r = api.http.post("/v1/hosts/cpu-a/rotate", headers=OP)
    assert r.status_code == 200
    new = r.json()["token"]
    assert new != old
    assert_error(register(api, old, "cpu-a"), 401, "unauthorized")
    assert register(api, new, "cpu-a").status_code == 200
    assert api.http.post("/v1/workers/claim", headers=running).status_code == 200  # kept
    r = api.http.post("/v1/hosts/cpu-a/rotate", json={"revoke_workers": True}, headers=OP)
    assert r.status_code == 200
    assert_error(api.http.post("/v1/workers/claim", headers=running), 401, "unauthorized")
    assert_error(api.http.post("/v1/hosts/nobody/rotate", headers=OP), 404, "not_found")


@pytest.mark.parametrize(
    "path", ["/metrics", "/v1/status", "/v1/jobs", "/v1/workers", "/v1/jobs/x/logs"]
)
def test_reads_and_metrics_need_a_token_unless_public(
    tmp_path: Path, clock: FakeClock, path: str
) -> None:
    with serve(tmp_path / "closed", clock) as api:
        assert_error(api.http.get(path), 401, "unauthorized")
        assert api.http.get(path, headers=OP).status_code in (200, 404)
        assert api.http.get("/health").status_code == 200
        assert api.http.get("/openapi.json").status_code == 200
    with serve(tmp_path / "public", clock, public_reads=True) as api:
        assert api.http.get(path).status_code in (200, 404)
        # Writes still need the operator token.
        assert_error(api.http.post("/v1/manifest", json={"text": ""}), 401, "unauthorized")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", "gpu box"),
        ("host", "-gpu"),
        ("host", "a" * 64),
        ("host", "gpu\x1b[31m"),
        ("hostname", "x" * 300),
        ("gpu_names", ["GPU\n0"]),
        ("torch_version", "2.0\x00"),
        ("cores", 0),
    ],
)
def test_a_bad_capability_string_is_a_400_with_a_json_body(
    api: Api, field: str, value: Any
) -> None:
    token = enroll(api, "cpu-a")
    cap = {**make_cap("cpu-a").model_dump(mode="json"), field: value}
    r = api.http.post("/v1/workers/register", json={"capability": cap}, headers=bearer(token))
    body = assert_error(r, 400, "bad_request")
    assert any(
        p["field"] == f"capability.{field}" or p["field"].startswith(f"capability.{field}.")
        for p in body["problems"]
    )
    assert api.coord.queue.list_workers() == []


def test_a_non_finite_capability_number_is_a_400(api: Api) -> None:
    token = enroll(api, "cpu-a")
    cap = make_cap("cpu-a").model_dump(mode="json")
    raw = json.dumps({"capability": cap}).replace('"ram_gib": 16.0', '"ram_gib": Infinity')
    r = api.http.post(
        "/v1/workers/register",
        content=raw,
        headers={**bearer(token), "content-type": "application/json"},
    )
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("given", [None, "a-new-operator-token"])
def test_a_token_file_is_owner_only_even_if_it_existed_looser(
    tmp_path: Path, given: str | None
) -> None:
    """Serving with a new token (rotating it), or with the one kept, leaves the file 0600:
    the mode passed to open() applies only to a file it creates."""
    path = tmp_path / "operator.token"
    path.write_text("the-old-token\n")
    path.chmod(0o644)
    token = ensure_token(path, given)
    assert token == (given or "the-old-token")
    assert path.read_text().strip() == token
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("verb", ["enroll", "rotate", "revoke"])
@pytest.mark.parametrize("name", ["cpu-a%0A", "cpu%E2%80%90a", "%D1%81pu-a", "a" * 64])
def test_every_host_path_applies_the_name_policy_whole(api: Api, verb: str, name: str) -> None:
    """A trailing newline passes a pattern's '$'; the name policy is checked whole-string on
    every path, so it is a 400 here, not a lookup of a name that cannot exist."""
    enroll(api, "cpu-a")
    r = api.http.post(f"/v1/hosts/{name}/{verb}", headers=OP)
    assert_error(r, 400, "bad_request")
    assert [h["name"] for h in api.http.get("/v1/hosts", headers=OP).json()["hosts"]] == ["cpu-a"]


def test_a_new_state_directory_is_the_owners_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    coord = build_coordinator(ServeConfig(state_dir=state))
    try:
        assert state.stat().st_mode & 0o777 == 0o700  # the queue's logs and results in it
        for name in ("operator.token", "join.token"):
            assert (state / name).stat().st_mode & 0o777 == 0o600
    finally:
        coord.queue.close()


def test_no_worker_or_join_token_passes_for_the_operator(api: Api) -> None:
    """Every operator-only route (from the OpenAPI description, so new ones are covered)
    refuses a worker credential, a host's join token and the shared join token."""
    host_token = enroll(api, "cpu-a")
    reg = register(api, host_token, "cpu-a").json()
    spec = api.http.get("/openapi.json").json()
    fill = {"{name}": "cpu-a", "{worker_id}": reg["worker_id"], "{job_id}": "x"}
    fill |= {"{sha256}": "0" * 64, "{fit_id}": "0" * 64}
    checked = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if op.get("security") != [{"operatorToken": []}]:
                continue
            for key, value in fill.items():
                path = path.replace(key, value)
            for token in (reg["token"], host_token, "join-token"):
                r = api.http.request(method.upper(), path, headers=bearer(token), json={})
                assert_error(r, 401, "unauthorized")
            checked += 1
    assert checked >= 10  # hosts, revoke, manifest, cancel, requeue and the reads
    assert api.http.post("/v1/workers/claim", headers=bearer(reg["token"])).status_code == 200
    assert [h["state"] for h in api.http.get("/v1/hosts", headers=OP).json()["hosts"]] == ["active"]
