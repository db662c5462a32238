"""The coordinator's HTTP API, served in-process: auth, JSON errors, OpenAPI, metrics, the
worker protocol with fencing and verified uploads, and the operator's reads and writes.

The app runs under Starlette's ``TestClient`` as a context manager, so its lifespan (the
reaper) runs too. The queue uses the test's fake clock; time passes only when a test says so.
Some tests drive the API through ``trainfleet.client.Client`` on the same in-process
transport, which covers the client's mapping of JSON errors back to exceptions.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from fleetkit import FakeClock, make_cap
from trainfleet.artifacts import ArtifactStore
from trainfleet.client import Client
from trainfleet.coordinator.app import create_app, db_runner
from trainfleet.coordinator.state import Coordinator
from trainfleet.errors import (
    BadRequest,
    Conflict,
    IntegrityError,
    NotFound,
    StaleEpoch,
    Unauthorized,
)
from trainfleet.queue import QueueSettings
from trainfleet.queue.sqlite import SQLiteQueue

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 under its TestClient; the project depends on httpx.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

OP_TOKEN, JOIN_TOKEN = "op-token", "join-token"

SWEEP = """
[[jobs]]
name = "alpha"
priority = 10
hyper = { steps = 5 }

[[jobs]]
name = "beta"
hyper = { steps = 5 }
"""

ONE_JOB = """
[[jobs]]
name = "solo"
hyper = { steps = 5 }
"""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


OP = bearer(OP_TOKEN)
JOIN = bearer(JOIN_TOKEN)


@dataclass
class Worker:
    id: str
    token: str
    registered: dict[str, Any]

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.token)


@dataclass
class Api:
    """The app in-process, its coordinator, and helpers to act as operator or worker."""

    http: TestClient
    coord: Coordinator
    clock: FakeClock
    tmp_path: Path
    _clients: list[Client] = field(default_factory=list)
    _join_tokens: dict[str, str] = field(default_factory=dict)  # host -> enrolled token

    def client(self, token: str | None) -> Client:
        """Our HTTP client, talking to the in-process app."""
        c = Client("http://testserver", token, transport=self.http._transport)
        self._clients.append(c)
        return c

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def reload(self, text: str = SWEEP, **body: Any) -> dict[str, Any]:
        r = self.http.post("/v1/manifest", json={"text": text, **body}, headers=OP)
        assert r.status_code == 200, r.text
        return r.json()

    def register(self, host: str = "cpu-a", **cap: Any) -> Worker:
        capability = make_cap(host, **cap).model_dump(mode="json")
        if host not in self._join_tokens:
            self._join_tokens[host] = self.coord.queue.enroll_host(host)
        headers = bearer(self._join_tokens[host])
        r = self.http.post("/v1/workers/register", json={"capability": capability}, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        return Worker(body["worker_id"], body["token"], body)

    def claim(self, worker: Worker) -> dict[str, Any]:
        r = self.http.post("/v1/workers/claim", headers=worker.auth)
        assert r.status_code == 200, r.text
        claim = r.json()["claim"]
        assert claim is not None
        return claim

    def claimed(self) -> tuple[Worker, str]:
        """A worker holding epoch 1 of the job 'solo' (loaded from ``ONE_JOB``)."""
        self.reload(ONE_JOB)
        worker = self.register()
        return worker, self.claim(worker)["job"]["id"]

    def flush(self) -> int:
        """The heartbeat book's flush (``beats.flush_forever``, every ``beat_flush_s``): its
        beats written, and what the database says of their jobs read back (a cancel)."""
        return self.http.portal.call(self.coord.beats.flush, db_runner(self.coord))

    def reap(self) -> list[Any]:
        """The reaper's pass (``app._reap_forever``): the heartbeat book's beats are written
        first, then the lost attempts requeued."""
        self.flush()
        return self.coord.queue.reap()

    def job(self, ref: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/jobs/{ref}", headers=OP)
        assert r.status_code == 200, r.text
        return r.json()

    def upload(self, worker: Worker, job_id: str, epoch: int, data: bytes, **query: Any) -> Any:
        sha = query.pop("sha", hashlib.sha256(data).hexdigest())
        params = {"epoch": epoch, "size": len(data), "name": "outputs.tar.zst", **query}
        return self.http.put(
            f"/v1/jobs/{job_id}/artifacts/{sha}", params=params, content=data, headers=worker.auth
        )


@contextmanager
def serve(tmp_path: Path, clock: FakeClock, **coord_kw: Any) -> Iterator[Api]:
    queue = SQLiteQueue(
        tmp_path / "q.db", settings=QueueSettings(heartbeat_timeout_s=10), clock=clock
    )
    coord = Coordinator(
        queue=queue,
        store=ArtifactStore(tmp_path / "artifacts"),
        staging_dir=tmp_path / "staging",
        operator_token=OP_TOKEN,
        join_token=JOIN_TOKEN,
        **coord_kw,
    )
    try:
        with TestClient(create_app(coord)) as http:
            api = Api(http, coord, clock, tmp_path)
            try:
                yield api
            finally:
                api.close()
    finally:
        queue.close()


# What every heartbeat reply carries besides cancel and state (coordinator.beats).
PACE = {"heartbeat_interval_s": 2.0, "heartbeat_timeout_s": 10.0}


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """A JSON error body with this status and code, and a message; never a traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert "Traceback" not in response.text
    return body


def staged_files(api: Api) -> list[Path]:
    return list(api.coord.staging_dir.iterdir())


# service endpoints ---------------------------------------------------------------------------


def test_health(api: Api) -> None:
    r = api.http.get("/health")
    assert r.status_code == 200
    assert r.json()["ok"] is True
    assert r.json()["version"]


def _collect_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _collect_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _collect_refs(item)


def test_openapi_describes_every_served_path(api: Api) -> None:
    r = api.http.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.1")
    assert spec["info"]["title"]
    served = {route.path for route in api.http.app.routes}  # type: ignore[attr-defined]
    assert {"/health", "/metrics", "/v1/workers/register", "/v1/manifest"} <= served
    assert served == set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"JobRecord", "Capability", "ReloadPlan", "ArtifactRecord"} <= set(schemas)
    # Every reference resolves to a described schema.
    for ref in _collect_refs(spec):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, ref
    # JSON request bodies name their schema; the upload is described as raw bytes.
    manifest_body = spec["paths"]["/v1/manifest"]["post"]["requestBody"]
    assert manifest_body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ManifestBody"
    }
    assert "epoch" in schemas["EpochBody"]["properties"]
    beat = spec["paths"]["/v1/jobs/{job_id}/heartbeat"]["post"]
    assert beat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/EpochBody"
    )
    assert beat["parameters"][0]["name"] == "job_id"
    # One security scheme per kind of token; each operation lists those it accepts.
    schemes = spec["components"]["securitySchemes"]
    assert set(schemes) == {"joinToken", "workerCredential", "operatorToken", "attemptToken"}
    assert beat["security"] == [{"workerCredential": []}]
    assert spec["paths"]["/v1/workers/register"]["post"]["security"] == [{"joinToken": []}]
    reader = spec["paths"]["/v1/routers/{fit_id}"]["get"]["security"]
    assert reader == [{"operatorToken": []}, {"workerCredential": []}]
    assert spec["paths"]["/v1/manifest"]["post"]["security"] == [{"operatorToken": []}]
    upload = spec["paths"]["/v1/jobs/{job_id}/artifacts/{sha256}"]["put"]
    assert "application/octet-stream" in upload["requestBody"]["content"]
    assert "security" not in spec["paths"]["/health"]["get"]


def test_metrics_count_jobs_and_requests(api: Api) -> None:
    api.reload(SWEEP)
    r = api.http.get("/metrics", headers=OP)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'trainfleet_jobs{state="pending"} 2.0' in text
    assert 'trainfleet_jobs{state="completed"} 0.0' in text
    assert (
        'trainfleet_http_requests_total{method="POST",route="/v1/manifest",status="200"} 1.0'
        in text
    )


# authentication ------------------------------------------------------------------------------

OPERATOR_CALLS = [
    ("GET", "/v1/status"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/workers"),
    ("GET", "/v1/jobs/alpha"),
    ("GET", "/v1/jobs/alpha/logs"),
    ("GET", "/v1/jobs/alpha/explain"),
    ("POST", "/v1/manifest"),
    ("POST", "/v1/jobs/alpha/cancel"),
    ("POST", "/v1/jobs/alpha/requeue"),
    ("GET", "/v1/artifacts/" + "0" * 64),
]


@pytest.mark.parametrize(("method", "path"), OPERATOR_CALLS)
def test_operator_endpoints_need_the_operator_token(api: Api, method: str, path: str) -> None:
    api.reload(SWEEP)
    worker = api.register()
    body = {"json": {"text": SWEEP}} if path == "/v1/manifest" else {}
    for headers in ({}, bearer("not-it"), JOIN, worker.auth, {"Authorization": "Basic op"}):
        r = api.http.request(method, path, headers=headers, **body)
        assert_error(r, 401, "unauthorized")
    # Nothing was cancelled or requeued by the refused calls.
    assert api.job("alpha")["job"]["state"] == "pending"
    # The operator gets past auth (requeueing a pending job is a conflict, the artifact is
    # missing; neither is a 401).
    assert api.http.request(method, path, headers=OP, **body).status_code in (200, 404, 409)


def test_a_non_ascii_token_is_a_401_not_a_crash(api: Api) -> None:
    odd = {"Authorization": b"Bearer t\xf6ken"}  # headers arrive as latin-1
    assert_error(api.http.get("/v1/status", headers=odd), 401, "unauthorized")
    assert_error(api.http.post("/v1/workers/register", headers=odd), 401, "unauthorized")
    assert_error(api.http.post("/v1/workers/claim", headers=odd), 401, "unauthorized")


def test_client_raises_unauthorized(api: Api) -> None:
    with pytest.raises(Unauthorized, match="wrong operator token") as info:
        api.client(JOIN_TOKEN).status()
    assert info.value.status_code == 401
    with pytest.raises(Unauthorized, match="Authorization"):
        api.client(None).jobs()
    assert api.client(OP_TOKEN).status()["counts"] == {}


def test_register_needs_a_host_enrollment_token(api: Api) -> None:
    cap = {"capability": make_cap().model_dump(mode="json")}
    assert_error(api.http.post("/v1/workers/register", json=cap), 401, "unauthorized")
    # Neither a wrong token, the operator token nor (outside open mode) the shared join token.
    for headers in (bearer("wrong"), OP, JOIN):
        r = api.http.post("/v1/workers/register", json=cap, headers=headers)
        assert_error(r, 401, "unauthorized")
    assert api.coord.queue.list_workers() == []
    enrolled = bearer(api.coord.queue.enroll_host("cpu-a"))
    assert api.http.post("/v1/workers/register", json=cap, headers=enrolled).status_code == 200
    assert len(api.coord.queue.list_workers()) == 1


def test_worker_endpoints_need_a_registered_credential(api: Api) -> None:
    api.reload(ONE_JOB)
    for headers in ({}, bearer("bogus"), JOIN, OP):
        assert_error(api.http.post("/v1/workers/claim", headers=headers), 401, "unauthorized")
    assert api.coord.queue.counts() == {"pending": 1}  # no claim slipped through

    worker = api.register()
    r = api.http.post("/v1/workers/claim", headers=worker.auth)
    assert r.status_code == 200
    assert r.json()["claim"]["job"]["name"] == "solo"

    # A deregistered worker's credential stops working.
    assert api.http.post("/v1/workers/deregister", headers=worker.auth).status_code == 204
    assert_error(api.http.post("/v1/workers/claim", headers=worker.auth), 401, "unauthorized")


# errors are JSON -----------------------------------------------------------------------------


def test_malformed_json_body_is_a_400(api: Api) -> None:
    r = api.http.post(
        "/v1/manifest",
        content=b'{"text": ',
        headers={**OP, "content-type": "application/json"},
    )
    body = assert_error(r, 400, "bad_request")
    assert "not valid JSON" in body["message"]


@pytest.mark.parametrize(
    ("payload", "field", "says"),
    [
        ({"epoch": 0}, "epoch", "greater than or equal to 1"),
        ({}, "epoch", "required"),
        ({"epoch": "one"}, "epoch", "integer"),
        ({"epoch": 1, "extra": True}, "extra", "not permitted"),
    ],
)
def test_invalid_body_lists_problems_by_field(
    api: Api, payload: dict[str, Any], field: str, says: str
) -> None:
    api.reload(ONE_JOB)
    worker = api.register()
    claim = api.claim(worker)
    r = api.http.post(f"/v1/jobs/{claim['job']['id']}/heartbeat", json=payload, headers=worker.auth)
    body = assert_error(r, 400, "bad_request")
    problems = {p["field"]: p["message"] for p in body["problems"]}
    assert field in problems
    assert says in problems[field]
    assert api.job("solo")["job"]["state"] == "claimed"  # the beat was not recorded


def test_invalid_body_through_the_client(api: Api) -> None:
    with pytest.raises(BadRequest) as info:
        api.client(OP_TOKEN).request("POST", "/v1/manifest", json={"txt": SWEEP})
    fields = {p["field"] for p in info.value.details["problems"]}
    assert fields == {"text", "txt"}


def test_unknown_route_and_wrong_method_are_json(api: Api) -> None:
    assert_error(api.http.get("/v2/nothing"), 404, "not_found")
    r = api.http.delete("/v1/status", headers=OP)
    assert_error(r, 405, "method_not_allowed")
    assert "GET" in r.headers["allow"]


def test_an_internal_error_is_a_500_without_details(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(api.coord.queue, "counts", broken)
    http = TestClient(api.http.app, raise_server_exceptions=False)
    try:
        r = http.get("/v1/status", headers=OP)
    finally:
        http.close()
    assert_error(r, 500, "internal")
    assert "on fire" not in r.text
    assert "the disk is on fire" in caplog.text  # but the coordinator's log has it


def test_unknown_job_is_a_404(api: Api) -> None:
    assert_error(api.http.get("/v1/jobs/nope", headers=OP), 404, "not_found")
    assert_error(api.http.post("/v1/jobs/nope/cancel", headers=OP), 404, "not_found")
    with pytest.raises(NotFound, match="nope"):
        api.client(OP_TOKEN).explain("nope")


def test_unknown_job_state_filter_is_a_400(api: Api) -> None:
    api.reload(SWEEP)
    body = assert_error(api.http.get("/v1/jobs?state=bogus", headers=OP), 400, "bad_request")
    assert "bogus" in body["message"]
    r = api.http.get("/v1/jobs?state=pending", headers=OP)
    assert {j["name"] for j in r.json()["jobs"]} == {"alpha", "beta"}
    assert api.http.get("/v1/jobs?state=running", headers=OP).json()["jobs"] == []


# manifest ------------------------------------------------------------------------------------


def test_invalid_manifest_names_the_field(api: Api) -> None:
    text = '[[jobs]]\nname = "x"\nbogus = 1\n'
    r = api.http.post("/v1/manifest", json={"text": text, "path": "fleet.toml"}, headers=OP)
    body = assert_error(r, 400, "bad_request")
    assert "fleet.toml" in body["message"]
    assert any("bogus" in p for p in body["problems"])
    assert api.coord.queue.list_jobs() == []


def test_reload_dry_run_then_apply_then_again(api: Api) -> None:
    plan = api.reload(SWEEP, dry_run=True)
    assert plan["applied"] is False
    assert {e["name"] for e in plan["added"]} == {"alpha", "beta"}
    assert api.http.get("/v1/jobs", headers=OP).json() == {"jobs": []}
    assert api.http.get("/v1/status", headers=OP).json()["manifest_hash"] is None

    plan = api.reload(SWEEP)
    assert plan["applied"] is True
    assert {e["name"] for e in plan["added"]} == {"alpha", "beta"}
    jobs = api.http.get("/v1/jobs", headers=OP).json()["jobs"]
    assert {(j["name"], j["state"]) for j in jobs} == {("alpha", "pending"), ("beta", "pending")}

    again = api.client(OP_TOKEN).reload(SWEEP, "fleet.toml")
    assert again["added"] == again["changed"] == again["removed"] == []
    assert {e["name"] for e in again["kept"]} == {"alpha", "beta"}
    assert again["manifest_hash"] == plan["manifest_hash"]


# the worker protocol -------------------------------------------------------------------------


def test_full_worker_flow_over_http(api: Api) -> None:
    plan = api.reload(ONE_JOB)

    worker = api.register("cpu-a", cores=8)
    reg = worker.registered
    assert reg["worker_id"] == worker.id
    assert reg["token"]
    assert reg["effective"]["cores"] == 8
    assert reg["effective"]["cuda"] is False
    assert reg["heartbeat_interval_s"] == api.coord.heartbeat_interval_s
    assert reg["heartbeat_timeout_s"] == 10

    claim = api.claim(worker)
    job_id = claim["job"]["id"]
    assert (claim["epoch"], claim["attempt"]) == (1, 1)
    assert claim["job"]["state"] == "claimed"
    assert claim["job"]["worker_id"] == worker.id
    # Asking again before any heartbeat (the reply was lost) gets the same claim back; a
    # second worker finds nothing left.
    r = api.http.post("/v1/workers/claim", headers=worker.auth)
    assert (r.json()["claim"]["job"]["id"], r.json()["claim"]["epoch"]) == (job_id, 1)
    r = api.http.post("/v1/workers/claim", headers=api.register("cpu-b").auth)
    assert r.json() == {"claim": None}

    r = api.http.post(f"/v1/jobs/{job_id}/heartbeat", json={"epoch": 1}, headers=worker.auth)
    # The reply carries the pace to keep: the interval, and the lease (>= 3 intervals + 1 s).
    assert r.json() == {"cancel": False, "state": "running", **PACE}
    # One job at a time per worker: the 409 names the job it holds.
    r = api.http.post("/v1/workers/claim", headers=worker.auth)
    assert_error(r, 409, "conflict")
    assert (r.json()["job_id"], r.json()["epoch"]) == (job_id, 1)

    for batch in (["step 1 loss 3.0", "step 2 loss 2.5"], ["step 3 loss 2.0"]):
        r = api.http.post(
            f"/v1/jobs/{job_id}/logs", json={"epoch": 1, "lines": batch}, headers=worker.auth
        )
        assert r.json() == {"count": len(batch)}
    page = api.http.get("/v1/jobs/solo/logs", headers=OP).json()
    assert [line["line"] for line in page["lines"]] == [
        "step 1 loss 3.0",
        "step 2 loss 2.5",
        "step 3 loss 2.0",
    ]
    assert {(line["attempt"], line["epoch"]) for line in page["lines"]} == {(1, 1)}
    assert page["next_after"] == page["lines"][-1]["seq"]
    assert page["state"] == "running"
    rest = api.http.get(f"/v1/jobs/solo/logs?after={page['lines'][0]['seq']}", headers=OP).json()
    assert [line["line"] for line in rest["lines"]] == ["step 2 loss 2.5", "step 3 loss 2.0"]
    tail = api.http.get(f"/v1/jobs/solo/logs?after={page['next_after']}", headers=OP).json()
    assert tail["lines"] == []
    assert tail["next_after"] == page["next_after"]

    data = b"model weights " * 1000
    sha = hashlib.sha256(data).hexdigest()
    r = api.upload(worker, job_id, 1, data)
    assert r.status_code == 200, r.text
    record = r.json()
    assert record["sha256"] == sha
    assert record["size"] == len(data)
    assert record["name"] == "outputs.tar.zst"
    assert (record["job_id"], record["attempt"], record["epoch"]) == (job_id, 1, 1)
    assert record["worker_id"] == worker.id
    assert record["capability"]["host"] == "cpu-a"
    assert record["manifest_hash"] == plan["manifest_hash"]
    assert staged_files(api) == []

    result = {"metrics": {"loss": 2.0, "steps": 3}, "artifact": sha}
    r = api.http.post(
        f"/v1/jobs/{job_id}/complete", json={"epoch": 1, "result": result}, headers=worker.auth
    )
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "completed"
    assert r.json()["result"] == result

    detail = api.job("solo")
    assert detail["job"]["state"] == "completed"
    assert [e["kind"] for e in detail["events"]] == [
        "added",
        "claimed",
        "redelivered",
        "running",
        "artifact",
        "completed",
    ]
    assert [a["sha256"] for a in detail["artifacts"]] == [sha]
    assert api.job(job_id[:12])["job"]["name"] == "solo"  # by id prefix too

    r = api.http.get(f"/v1/artifacts/{sha}", headers=OP)
    assert r.status_code == 200
    assert r.content == data
    assert_error(api.http.get(f"/v1/artifacts/{'f' * 64}", headers=OP), 404, "not_found")
    assert_error(api.http.get("/v1/artifacts/xyz", headers=OP), 400, "bad_request")

    status = api.http.get("/v1/status", headers=OP).json()
    assert status["counts"] == {"completed": 1}
    assert "trainfleet_upload_bytes_total 14000.0" in api.http.get("/metrics", headers=OP).text


def test_client_upload_and_download_round_trip(api: Api, tmp_path: Path) -> None:
    api.reload(ONE_JOB)
    worker = api.register()
    client = api.client(worker.token)
    claim = client.claim()
    assert claim is not None
    src = tmp_path / "outputs.tar.zst"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, over more than one chunk
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    record = client.upload(claim["job"]["id"], claim["epoch"], src, sha, "outputs.tar.zst")
    assert record["size"] == src.stat().st_size
    job = client.complete(claim["job"]["id"], claim["epoch"], {"artifact": sha})
    assert job["state"] == "completed"

    operator = api.client(OP_TOKEN)
    dest = tmp_path / "downloaded"
    operator.download(sha, dest)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(NotFound):
        operator.download("e" * 64, tmp_path / "missing")


# upload integrity ----------------------------------------------------------------------------


DATA = b"the artifact bytes " * 100


@pytest.mark.parametrize(
    ("sent", "query"),
    [
        pytest.param(DATA, {"sha": hashlib.sha256(b"other").hexdigest()}, id="wrong-digest"),
        pytest.param(
            DATA[:-10], {"sha": hashlib.sha256(DATA).hexdigest(), "size": len(DATA)}, id="short"
        ),
        pytest.param(
            DATA + b"more", {"sha": hashlib.sha256(DATA).hexdigest(), "size": len(DATA)}, id="long"
        ),
    ],
)
def test_upload_that_does_not_match_is_refused_and_nothing_kept(
    api: Api, running: tuple[Worker, str], sent: bytes, query: dict[str, Any]
) -> None:
    worker, job_id = running
    r = api.upload(worker, job_id, 1, sent, **query)
    assert_error(r, 422, "integrity_error")
    assert api.coord.queue.artifacts(job_id) == []
    assert not api.coord.store.exists(query["sha"])
    assert not api.coord.store.exists(hashlib.sha256(sent).hexdigest())
    assert staged_files(api) == []
    assert "artifact" not in [e["kind"] for e in api.job(job_id)["events"]]


def test_upload_mismatch_through_the_client(
    api: Api, running: tuple[Worker, str], tmp_path: Path
) -> None:
    worker, job_id = running
    src = tmp_path / "out.bin"
    src.write_bytes(DATA)
    with pytest.raises(IntegrityError, match="sha256 mismatch") as info:
        api.client(worker.token).upload(job_id, 1, src, "a" * 64, "out.bin")
    assert info.value.status_code == 422
    assert info.value.details["actual_sha256"] == hashlib.sha256(DATA).hexdigest()


def test_upload_request_errors(api: Api, running: tuple[Worker, str]) -> None:
    worker, job_id = running
    body = assert_error(api.upload(worker, job_id, 1, DATA, sha="ABC"), 400, "bad_request")
    assert "sha256" in body["message"]
    r = api.http.put(
        f"/v1/jobs/{job_id}/artifacts/{hashlib.sha256(DATA).hexdigest()}",
        params={"epoch": 1},
        content=DATA,
        headers=worker.auth,
    )
    body = assert_error(r, 400, "bad_request")
    assert "size" in body["message"]
    assert_error(api.upload(worker, job_id, 1, DATA, size="big"), 400, "bad_request")
    assert api.coord.queue.artifacts(job_id) == []
    assert not api.coord.store.exists(hashlib.sha256(DATA).hexdigest())


def test_upload_over_the_size_limit_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    with serve(tmp_path, clock, max_upload_bytes=100) as api:
        worker, job_id = api.claimed()
        body = assert_error(api.upload(worker, job_id, 1, b"x" * 101), 413, "payload_too_large")
        assert "limit" in body["message"]
        assert api.upload(worker, job_id, 1, b"x" * 100).status_code == 200


def test_complete_naming_an_artifact_never_uploaded_is_refused(
    api: Api, running: tuple[Worker, str]
) -> None:
    worker, job_id = running
    r = api.http.post(
        f"/v1/jobs/{job_id}/complete",
        json={"epoch": 1, "result": {"artifact": "c" * 64}},
        headers=worker.auth,
    )
    body = assert_error(r, 400, "bad_request")
    assert "not uploaded" in body["message"]
    assert api.job(job_id)["job"]["state"] == "running"


# fencing -------------------------------------------------------------------------------------


def test_a_stale_worker_is_fenced_off_everywhere(api: Api, tmp_path: Path) -> None:
    api.reload(ONE_JOB)
    first, second = api.register("cpu-a"), api.register("cpu-b")
    old = api.claim(first)
    job_id = old["job"]["id"]
    api.clock.advance(11)  # past heartbeat_timeout_s without a beat
    api.reap()  # the app's reaper may have done this already; same outcome
    assert api.job(job_id)["job"]["state"] == "pending"
    new = api.claim(second)
    assert (new["job"]["id"], new["epoch"], new["attempt"]) == (job_id, 2, 2)

    stale = api.client(first.token)
    src = tmp_path / "late.bin"
    src.write_bytes(DATA)
    sha = hashlib.sha256(DATA).hexdigest()
    calls = {
        "heartbeat": lambda: stale.heartbeat(job_id, 1),
        "log": lambda: stale.append_log(job_id, 1, ["late line"]),
        "upload": lambda: stale.upload(job_id, 1, src, sha, "late.bin"),
        "complete": lambda: stale.complete(job_id, 1, {"metrics": {}}),
        "fail": lambda: stale.fail(job_id, 1, "boom"),
    }
    for name, call in calls.items():
        with pytest.raises(StaleEpoch) as info:
            call()
        assert info.value.status_code == 409, name
        assert info.value.details["current_epoch"] == 2, name

    # The same refusal on the wire.
    r = api.http.post(f"/v1/jobs/{job_id}/heartbeat", json={"epoch": 1}, headers=first.auth)
    assert_error(r, 409, "stale_epoch")

    # None of the stale writes landed; the new holder is untouched.
    assert not api.coord.store.exists(sha)
    assert api.coord.queue.artifacts(job_id) == []
    assert api.coord.queue.logs(job_id) == []
    job = api.job(job_id)["job"]
    assert (job["state"], job["worker_id"], job["epoch"]) == ("claimed", second.id, 2)
    current = api.client(second.token)
    assert current.heartbeat(job_id, 2)["state"] == "running"


def test_lifespan_reaper_requeues_a_silent_job(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(tmp_path, clock, reap_interval_s=0.01) as api:
        queue = api.coord.queue
        reaped = threading.Event()
        real_reap = queue.reap

        def reap() -> list[Any]:
            jobs = real_reap()
            if jobs:
                reaped.set()
            return jobs

        monkeypatch.setattr(queue, "reap", reap)
        _, job_id = api.claimed()
        clock.advance(11)
        assert reaped.wait(timeout=10), "the app's reaper never requeued the job"
        assert api.job(job_id)["job"]["state"] == "pending"
        assert "trainfleet_lost_attempts_total 1.0" in api.http.get("/metrics", headers=OP).text


# operator actions ----------------------------------------------------------------------------


def test_cancel_reaches_the_worker_at_its_next_heartbeat(
    api: Api, running: tuple[Worker, str]
) -> None:
    worker, job_id = running
    operator, client = api.client(OP_TOKEN), api.client(worker.token)
    assert operator.cancel("solo")["state"] == "cancelled"
    assert client.heartbeat(job_id, 1) == {"cancel": True, "state": "cancelled", **PACE}
    with pytest.raises(Conflict, match="cancelled") as info:
        client.complete(job_id, 1, {"metrics": {"loss": 1.0}})
    assert info.value.status_code == 409
    assert not isinstance(info.value, StaleEpoch)
    assert operator.job("solo")["job"]["state"] == "cancelled"
    assert api.http.get("/v1/status", headers=OP).json()["counts"] == {"cancelled": 1}
    # Cancelling twice is a conflict, reported as JSON.
    assert_error(api.http.post("/v1/jobs/solo/cancel", headers=OP), 409, "conflict")

    requeued = api.http.post("/v1/jobs/solo/requeue", headers=OP)
    assert requeued.status_code == 200
    assert requeued.json()["state"] == "pending"
    assert_error(api.http.post("/v1/jobs/solo/requeue", headers=OP), 409, "conflict")
    # The old claim stays fenced off after the requeue.
    with pytest.raises(StaleEpoch):
        client.heartbeat(job_id, 1)


def test_explain_says_what_a_job_needs(api: Api) -> None:
    api.reload('[[jobs]]\nname = "big"\nrequire_cuda = true\nhyper = { steps = 5 }\n')
    api.register("cpu-a")
    r = api.http.get("/v1/jobs/big/explain", headers=OP)
    assert r.status_code == 200
    why = r.json()
    assert why["name"] == "big"
    assert why["state"] == "pending"
    assert why["eligible_online"] == []
    assert "needs CUDA" in why["message"]
    assert any("needs CUDA" in reasons for reasons in why["hosts"].values())


def test_workers_and_status(api: Api) -> None:
    api.reload(SWEEP)
    cpu = api.register("cpu-a", cores=2)
    gpu = api.register("gpu-a", cuda=True, vram_gib=24)
    api.claim(gpu)

    workers = {w["id"]: w for w in api.client(OP_TOKEN).workers()}
    assert set(workers) == {cpu.id, gpu.id}
    assert workers[cpu.id]["effective"]["cores"] == 2
    assert workers[gpu.id]["effective"]["cuda"] is True
    assert workers[gpu.id]["effective"]["vram_gib"] == 24
    assert workers[gpu.id]["current_job"] is not None
    assert {w["state"] for w in workers.values()} == {"online"}

    status = api.http.get("/v1/status", headers=OP).json()
    assert status["counts"] == {"pending": 1, "claimed": 1}
    assert status["workers_online"] == 2
    assert status["manifest_hash"]
    assert status["version"]


def test_a_restarted_coordinator_renews_leases_before_reaping(
    tmp_path: Path, clock: FakeClock
) -> None:
    with serve(tmp_path, clock) as api:
        _, job_id = api.claimed()
    clock.advance(600)  # the coordinator was down far longer than the heartbeat timeout
    with serve(tmp_path, clock, reap_interval_s=0.01) as api:  # same database, new process
        job = api.job(job_id)["job"]
        assert job["heartbeat_at"] == clock.now  # renewed at start, before the first reap
        assert api.coord.queue.reap() == []
        assert job["state"] == "claimed" and job["attempt"] == 1
