"""The pipelines' HTTP API, served in-process: the driver starting a pipeline from its
teacher's model, the fenced attach, the attempt token (wrong, stale, another job's, another
pipeline's), the ref queue's routes (publish, lease, ack, return, sync) with their JSON
shapes and 4xx bodies, the operator's reads (never the secret), the teacher model download
for producers only, and ``HttpControl`` (the programs' client) over the same app.

Workers here are registered through the API and act by hand, as ``trainfleet join`` does;
the teacher job's output is a real packed directory holding a real GPT ``model.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import save as save_bytes
from test_api import OP, OP_TOKEN, Api, Worker, assert_error, bearer, serve

from fleetkit import FakeClock
from trainfleet.artifacts import pack_dir
from trainfleet.coordinator import pipelines as pipelines_module
from trainfleet.coordinator.auth import attempt_token
from trainfleet.coordinator.pipelines import PipelineDriver
from trainfleet.coordinator.routes_pipelines import MAX_BODY_BYTES
from trainfleet.errors import CoordinatorUnavailable, NotFound
from trainfleet.features.ref import SampleRef, sign_ref
from trainfleet.manifest.pipelines import bucket, sample_id
from trainfleet.pipeline.client import AttemptFenced, HttpControl
from trainfleet.train.inner import init_weights
from trainfleet.train.recipes import GPTParams

HYPER = {"n_layers": 1, "d_model": 8, "n_heads": 1, "seq_len": 8, "batch_size": 1, "steps": 2}
SAMPLES = 8
MANIFEST = f"""
[datasets.tiny]
source = "synthetic"
num_documents = 20
doc_tokens = 64
shard_tokens = 256

[[jobs]]
name = "teacher"
dataset = "tiny"
max_failures = 1
hyper = {{ n_layers = 1, d_model = 8, n_heads = 1, seq_len = 8, batch_size = 1, steps = 2 }}

[[pipelines]]
name = "distill"
teacher = "teacher"
dataset = "tiny"
student = {{ n_layers = 1, d_model = 8, n_heads = 1, seq_len = 8, batch_size = 1 }}
samples = {SAMPLES}
producers = 1
consumers = 2
"""


@dataclass
class Attempt:
    """A claimed pipeline job: its worker, id, epoch and (once attached) attach reply."""

    worker: Worker
    job_id: str
    epoch: int
    attach: dict[str, Any]

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.attach["attempt_token"])


@dataclass
class Started:
    api: Api
    teacher_sha: str
    pipeline_id: str
    producer: Attempt
    consumers: list[Attempt]

    def post(self, route: str, body: Any, who: Attempt, **kw: Any) -> httpx.Response:
        return self.api.http.post(
            f"/v1/pipelines/{self.pipeline_id}/{route}", json=body, headers=who.auth, **kw
        )

    def ref(self, idx: int, secret: str | None = None, **fields: Any) -> dict[str, Any]:
        """A signed ref of sample ``idx`` (what a producer's store would mint)."""
        sid = sample_id(idx)
        values: dict[str, Any] = {
            "store": "http://127.0.0.1:1",
            "pipeline": self.pipeline_id,
            "sample_id": sid,
            "key": sid,
            "generation": 1,
            "digest": hashlib.sha256(sid.encode()).hexdigest(),  # any 64 hex: never fetched
            "size": 100,
            **fields,
        }
        key = bytes.fromhex(secret or self.producer.attach["secret"])
        return sign_ref(**values, secret=key).model_dump(mode="json")


def teacher_output(tmp_path: Path) -> tuple[Path, bytes]:
    """A packed output directory like a gpt train job's, with a real model."""
    out = tmp_path / "teacher-out"
    out.mkdir()
    weights = init_weights(GPTParams(**HYPER))
    model = save_bytes({k: weights[k].contiguous() for k in sorted(weights)})
    (out / "model.safetensors").write_bytes(model)
    (out / "metrics.json").write_text(json.dumps({"heldout_loss": 5.0}))
    pack_dir(out, tmp_path / "outputs.tar.zst")
    return tmp_path / "outputs.tar.zst", model


def run_teacher(api: Api, *, fail: bool = False) -> tuple[Worker, str, bytes]:
    """A worker claims the teacher job and completes it with its model (or fails it)."""
    worker = api.register("teacher-host")
    claim = api.claim(worker)
    job_id = claim["job"]["id"]
    assert claim["job"]["name"] == "teacher"
    r = api.http.post(f"/v1/jobs/{job_id}/heartbeat", json={"epoch": 1}, headers=worker.auth)
    assert r.status_code == 200, r.text
    if fail:
        body = {"epoch": 1, "error": "diverged", "retryable": False}
        r = api.http.post(f"/v1/jobs/{job_id}/fail", json=body, headers=worker.auth)
        assert r.status_code == 200, r.text
        return worker, job_id, b""
    archive, model = teacher_output(api.tmp_path)
    r = api.upload(worker, job_id, 1, archive.read_bytes())
    assert r.status_code == 200, r.text
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    body = {"epoch": 1, "result": {"metrics": {}, "artifact": sha, "artifact_size": 1}}
    r = api.http.post(f"/v1/jobs/{job_id}/complete", json=body, headers=worker.auth)
    assert r.status_code == 200, r.text
    return worker, job_id, model


def attach(api: Api, worker: Worker, job_id: str, epoch: int) -> httpx.Response:
    return api.http.post(f"/v1/jobs/{job_id}/pipeline", json={"epoch": epoch}, headers=worker.auth)


@pytest.fixture(autouse=True)
def _quiet_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's own pipeline driver waits an hour between ticks: the tests tick it."""
    monkeypatch.setattr(pipelines_module, "TICK_S", 3600.0)


@pytest.fixture
def started(tmp_path: Path, clock: FakeClock) -> Iterator[Started]:
    """The teacher completed, the driver started the pipeline, and one producer and two
    consumer jobs are claimed and attached, each by a worker of its own host."""
    with serve(tmp_path, clock) as api:
        api.reload(MANIFEST)
        _, _, model = run_teacher(api)
        woken: list[bool] = []
        api.coord.work.notify = lambda: woken.append(True)  # type: ignore[method-assign]
        assert PipelineDriver(api.coord).tick() == 3  # one producer, two consumers
        assert woken == [True]  # long-poll claims hear of them at once
        attempts: dict[str, Attempt] = {}
        for host in ("host-a", "host-b", "host-c"):
            worker = api.register(host)
            claim = api.claim(worker)
            r = attach(api, worker, claim["job"]["id"], claim["epoch"])
            assert r.status_code == 200, r.text
            attempts[claim["job"]["name"]] = Attempt(
                worker, claim["job"]["id"], claim["epoch"], r.json()
            )
        assert sorted(attempts) == ["distill.consumer0", "distill.consumer1", "distill.producer0"]
        producer = attempts["distill.producer0"]
        yield Started(
            api,
            hashlib.sha256(model).hexdigest(),
            producer.attach["pipeline_id"],
            producer,
            [attempts["distill.consumer0"], attempts["distill.consumer1"]],
        )


# the driver and the attach --------------------------------------------------------------
def test_the_driver_starts_the_pipeline_on_the_teachers_model(started: Started) -> None:
    record = started.api.coord.queue.get_pipeline("distill")
    assert record.state == "producing"
    assert record.teacher_model == started.teacher_sha
    assert started.api.coord.store.exists(started.teacher_sha)  # extracted, stored
    # Ticking again inserts nothing and changes nothing.
    assert PipelineDriver(started.api.coord).tick() == 0
    assert started.api.coord.queue.get_pipeline("distill").state == "producing"


def test_a_failed_teacher_fails_the_pipeline(tmp_path: Path, clock: FakeClock) -> None:
    with serve(tmp_path, clock) as api:
        api.reload(MANIFEST)
        run_teacher(api, fail=True)
        assert PipelineDriver(api.coord).tick() == 0
        record = api.coord.queue.get_pipeline("distill")
        assert record.state == "failed"
        assert "teacher job teacher failed" in record.detail and "diverged" in record.detail


def test_attach_replies_with_the_secret_token_spec_and_teacher(started: Started) -> None:
    producer, consumer = started.producer.attach, started.consumers[0].attach
    assert producer["role"] == "producer" and producer["index"] == 0
    assert consumer["role"] == "consumer" and consumer["index"] == 0
    assert producer["name"] == "distill" and producer["spec"]["samples"] == SAMPLES
    assert producer["teacher_model"] == started.teacher_sha
    assert producer["teacher_params"]["d_model"] == HYPER["d_model"]
    secret = producer["secret"]
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert consumer["secret"] == secret  # one secret per pipeline
    job_id, epoch = started.producer.job_id, started.producer.epoch
    key = started.api.coord.queue.pipeline_attempt_key(started.pipeline_id)
    assert key != secret  # the attempt key signs tokens; no job is ever told it
    assert producer["attempt_token"] == attempt_token(key, job_id, epoch)
    assert key not in json.dumps(producer)
    assert producer["attempt_token"].startswith(f"{job_id}.{epoch}.")


def test_attach_is_fenced_by_the_claim(started: Started) -> None:
    api, p = started.api, started.producer
    assert_error(attach(api, p.worker, p.job_id, p.epoch + 1), 409, "stale_epoch")
    other = started.consumers[0].worker
    assert_error(attach(api, other, p.job_id, p.epoch), 409, "stale_epoch")
    r = api.http.post(f"/v1/jobs/{p.job_id}/pipeline", json={"epoch": 0}, headers=p.worker.auth)
    assert_error(r, 400, "bad_request")
    r = api.http.post(f"/v1/jobs/{p.job_id}/pipeline", json={"epoch": 1}, headers=OP)
    assert_error(r, 401, "unauthorized")


def test_attach_of_a_job_that_is_no_pipeline_job_is_refused(
    tmp_path: Path, clock: FakeClock
) -> None:
    with serve(tmp_path, clock) as api:
        api.reload(MANIFEST)
        worker = api.register("teacher-host")
        claim = api.claim(worker)  # the teacher: a train job
        body = assert_error(
            attach(api, worker, claim["job"]["id"], claim["epoch"]), 400, "bad_request"
        )
        assert "not a pipeline job" in body["message"]


# the attempt token ----------------------------------------------------------------------
def test_the_attempt_token_is_refused_when_wrong_unknown_or_of_another_role(
    started: Started,
) -> None:
    p, c = started.producer, started.consumers[0]
    sync = {"released": []}
    for headers in (
        {},
        OP,
        bearer(p.worker.token),
        bearer("not-a-token"),
        bearer(f"{p.job_id}.{p.epoch}.{'0' * 64}"),  # wrong MAC
        bearer(attempt_token("11" * 32, p.job_id, p.epoch)),  # signed with another secret
        bearer(attempt_token(p.attach["secret"], "ef" * 32, 1)),  # no such job
    ):
        r = started.api.http.post(
            f"/v1/pipelines/{started.pipeline_id}/sync", json=sync, headers=headers
        )
        assert_error(r, 401, "unauthorized")
    # A consumer's token on a producer's route, a producer's on a consumer's: 403.
    assert_error(started.post("sync", sync, c), 403, "forbidden")
    assert_error(started.post("lease", {"max_samples": 1}, p), 403, "forbidden")
    # Another pipeline's path.
    r = started.api.http.post(f"/v1/pipelines/{'ab' * 32}/sync", json=sync, headers=p.auth)
    assert_error(r, 403, "forbidden")


def test_a_stale_attempt_hears_409_but_only_with_a_genuine_token(started: Started) -> None:
    api, c = started.api, started.consumers[1]
    body = {"epoch": c.epoch, "error": "shutting down", "release": True}
    r = api.http.post(f"/v1/jobs/{c.job_id}/fail", json=body, headers=c.worker.auth)
    assert r.status_code == 200, r.text  # handed back: the attempt is over
    assert_error(started.post("lease", {"max_samples": 1}, c), 409, "stale_epoch")
    forged = bearer(f"{c.job_id}.{c.epoch}.{'0' * 64}")
    r = api.http.post(
        f"/v1/pipelines/{started.pipeline_id}/lease", json={"max_samples": 1}, headers=forged
    )
    assert_error(r, 401, "unauthorized")


# the ref queue's routes -----------------------------------------------------------------
def test_publish_lease_ack_return_and_sync(started: Started) -> None:
    p, c0, c1 = started.producer, *started.consumers
    refs = [started.ref(i) for i in range(SAMPLES)]
    r = started.post("publish", {"refs": refs}, p)
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": [sample_id(i) for i in range(SAMPLES)], "skipped": []}
    again = started.post("publish", {"refs": refs[:1]}, p).json()
    assert again["accepted"] == [] and again["skipped"][0]["sample_id"] == sample_id(0)
    assert again["skipped"][0]["reason"]

    mine = sorted(sample_id(i) for i in range(SAMPLES) if bucket(sample_id(i)) % 2 == 0)
    r = started.post("lease", {"max_samples": SAMPLES}, c0)
    assert r.status_code == 200, r.text
    lease = r.json()
    assert set(lease) == {"samples", "retire", "done", "num_consumers"}
    assert (lease["retire"], lease["done"], lease["num_consumers"]) == (False, False, 2)
    leased = [s["sample_id"] for s in lease["samples"]]
    assert leased == mine  # its own partition, in idx order
    assert lease["samples"][0] == refs[int(mine[0])]  # the ref as published, nothing more
    SampleRef.model_validate(lease["samples"][0])

    acks = {"acks": [{"sample_id": leased[0], "step": 0}, {"sample_id": "00000099", "step": 1}]}
    results = started.post("ack", acks, c0).json()["results"]
    assert results[0] == {"sample_id": leased[0], "accepted": True, "reason": ""}
    assert results[1]["accepted"] is False and results[1]["reason"]
    # Another consumer cannot ack what c0 leased: it must not train on it.
    other = started.post("ack", {"acks": [{"sample_id": leased[1], "step": 0}]}, c1).json()
    assert other["results"][0]["accepted"] is False

    r = started.post("return", {"sample_ids": [leased[1]]}, c0)
    assert r.status_code == 200 and r.json() == {"returned": 1}

    sync = started.post("sync", {"released": []}, p).json()
    assert set(sync) == {"release", "produce", "finished"}
    assert [s["sample_id"] for s in sync["release"]] == [leased[0]]  # consumed: free it
    assert sync["produce"] == [int(leased[1])]  # returned: make it again
    assert sync["finished"] is False
    after = started.post("sync", {"released": [leased[0]]}, p).json()
    assert after["release"] == []

    counts = started.api.http.get("/v1/pipelines/distill", headers=OP).json()["counts"]
    assert counts["produced"] == SAMPLES and counts["consumed"] == 1
    assert counts["released"] == 1 and counts["in_flight"] == len(mine) - 2


def test_a_ref_that_does_not_verify_is_refused_naming_the_sample(started: Started) -> None:
    forged = started.ref(3, secret="22" * 32)
    body = assert_error(
        started.post("publish", {"refs": [forged]}, started.producer), 400, "bad_request"
    )
    assert "00000003" in body["message"]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("lease", {"max_samples": 0}),
        ("lease", {"max_samples": 257}),
        ("lease", {"max_samples": "all"}),
        ("lease", {"max_samples": 1, "extra": True}),
        ("lease", {}),
        ("ack", {"acks": [{"sample_id": "../etc", "step": 0}]}),
        ("ack", {"acks": [{"sample_id": "00000001", "step": -1}]}),
        ("ack", {"acks": [{"sample_id": "00000001", "step": 0}] * 257}),
        ("return", {"sample_ids": ["a b"]}),
        ("return", {"sample_ids": "00000001"}),
    ],
)
def test_malformed_consumer_bodies_are_400_json(
    started: Started, route: str, body: dict[str, Any]
) -> None:
    assert_error(started.post(route, body, started.consumers[0]), 400, "bad_request")


def test_malformed_and_oversize_producer_bodies_are_4xx_json(started: Started) -> None:
    p = started.producer
    ref = started.ref(0)
    for body in (
        {"refs": [ref] * 257},
        {"refs": [{**ref, "bytes": "AAAA"}]},  # a ref carries no payload
        {"refs": [{**ref, "generation": 0}]},
        {"released": ["x" * 129]},
    ):
        assert_error(
            started.post("publish" if "refs" in body else "sync", body, p), 400, "bad_request"
        )
    r = started.api.http.post(
        f"/v1/pipelines/{started.pipeline_id}/publish",
        content=b"{not json",
        headers={**p.auth, "content-type": "application/json"},
    )
    assert_error(r, 400, "bad_request")
    big = {"released": ["0" * 100] * (MAX_BODY_BYTES // 100)}
    assert_error(started.post("sync", big, p), 413, "payload_too_large")


# the operator's reads and the teacher download ------------------------------------------
def test_reads_list_pipelines_with_counts_and_never_the_secret(started: Started) -> None:
    api, secret = started.api, started.producer.attach["secret"]
    listing = api.http.get("/v1/pipelines", headers=OP)
    detail = api.http.get("/v1/pipelines/distill", headers=OP)
    by_id = api.http.get(f"/v1/pipelines/{started.pipeline_id}", headers=OP)
    for r in (listing, detail, by_id):
        assert r.status_code == 200, r.text
        assert secret not in r.text and '"secret"' not in r.text
    entry = listing.json()["pipelines"][0]
    assert entry["pipeline"]["name"] == "distill" and entry["pipeline"]["state"] == "producing"
    assert entry["counts"]["samples"] == SAMPLES and entry["counts"]["backlog"] == SAMPLES
    names = sorted(j["name"] for j in detail.json()["jobs"])
    assert names == ["distill.consumer0", "distill.consumer1", "distill.producer0"]
    assert by_id.json()["pipeline"] == detail.json()["pipeline"]
    assert_error(api.http.get("/v1/pipelines/nope", headers=OP), 404, "not_found")
    assert_error(api.http.get("/v1/pipelines"), 401, "unauthorized")
    # The CLI's client reads the same.
    client = api.client(OP_TOKEN)
    assert client.pipelines()[0]["pipeline"]["id"] == started.pipeline_id
    assert client.pipeline("distill")["counts"]["produced"] == 0
    with pytest.raises(NotFound):
        client.pipeline("nope")


def test_only_a_producer_of_the_pipeline_may_download_the_teacher(started: Started) -> None:
    api, path = started.api, f"/v1/market/models/{started.teacher_sha}"
    r = api.http.get(path, headers=started.producer.worker.auth)
    assert r.status_code == 200, r.text
    assert hashlib.sha256(r.content).hexdigest() == started.teacher_sha
    assert_error(api.http.get(path, headers=started.consumers[0].worker.auth), 403, "forbidden")
    assert api.coord.queue.holds_model(started.producer.worker.id, started.teacher_sha)
    assert not api.coord.queue.holds_model(started.producer.worker.id, "00" * 32)


def test_the_openapi_document_lists_the_pipeline_routes(started: Started) -> None:
    spec = started.api.http.get("/openapi.json").json()
    for route in ("publish", "lease", "ack", "return", "sync"):
        op = spec["paths"][f"/v1/pipelines/{{pipeline_id}}/{route}"]["post"]
        assert op["security"] == [{"attemptToken": []}]
        assert {"401", "403", "409", "413"} <= set(op["responses"])
    assert "post" in spec["paths"]["/v1/jobs/{job_id}/pipeline"]
    assert "get" in spec["paths"]["/v1/pipelines/{pipeline}"]


# HttpControl, the programs' side --------------------------------------------------------
def control(started: Started, who: Attempt, **kw: Any) -> HttpControl:
    return HttpControl(
        "http://testserver",
        who.attach["attempt_token"],
        started.pipeline_id,
        transport=started.api.http._transport,
        **kw,
    )


def test_http_control_publishes_leases_acks_and_syncs(started: Started) -> None:
    producer, consumer = control(started, started.producer), control(started, started.consumers[1])
    try:
        refs = [SampleRef.model_validate(started.ref(i)) for i in range(SAMPLES)]
        published = producer.publish(refs)
        assert published.accepted == [r.sample_id for r in refs] and published.skipped == []
        lease = consumer.lease(SAMPLES)
        mine = [sample_id(i) for i in range(SAMPLES) if bucket(sample_id(i)) % 2 == 1]
        assert [s.sample_id for s in lease.samples] == mine
        assert lease.samples[0] == refs[int(mine[0])]
        results = consumer.ack([(mine[0], 0), (mine[0], 5)])  # again: idempotent
        assert [(a.accepted, a.reason) for a in results] == [(True, ""), (True, results[1].reason)]
        assert consumer.return_samples(mine[1:2]) == 1
        sync = producer.sync([])
        assert [r.sample_id for r in sync.release] == mine[:1]
        assert sync.produce == [int(mine[1])] and not sync.finished
    finally:
        producer.close()
        consumer.close()


def test_http_control_exits_clearly_once_the_attempt_is_written_off(started: Started) -> None:
    c = started.consumers[0]
    body = {"epoch": c.epoch, "error": "gone", "release": True}
    started.api.http.post(f"/v1/jobs/{c.job_id}/fail", json=body, headers=c.worker.auth)
    with control(started, c) as ctl, pytest.raises(AttemptFenced, match="written off"):
        ctl.lease(1)


def test_http_control_retries_an_unreachable_coordinator_within_its_patience() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) < 3:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"returned": 2})

    slept: list[float] = []
    transport = httpx.MockTransport(handler)
    with HttpControl("http://c", "t", "ab" * 32, transport=transport, sleep=slept.append) as ctl:
        assert ctl.return_samples(["00000001", "00000002"]) == 2
    assert len(calls) == 3 and len(slept) == 2
    assert calls[0] == f"/v1/pipelines/{'ab' * 32}/return"
    down = httpx.MockTransport(lambda r: httpx.Response(503, text="down"))
    with (
        HttpControl(
            "http://c", "t", "ab" * 32, transport=down, sleep=slept.append, patience_s=0.0
        ) as ctl,
        pytest.raises(CoordinatorUnavailable),
    ):
        ctl.sync([])


def test_a_reload_that_adds_a_consumer_queues_its_job(started: Started) -> None:
    api = started.api
    api.reload(MANIFEST.replace("consumers = 2", "consumers = 3"))
    assert PipelineDriver(api.coord).tick() == 1
    names = sorted(
        j["name"] for j in api.http.get("/v1/pipelines/distill", headers=OP).json()["jobs"]
    )
    assert names[-1] == "distill.producer0" and "distill.consumer2" in names
    lease = started.post("lease", {"max_samples": 1}, started.consumers[0]).json()
    assert lease["num_consumers"] == 3
