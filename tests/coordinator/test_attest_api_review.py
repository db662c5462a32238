"""Attacks on the attestation endpoints, in-process: a quote a float cannot hold is a 400 not
a 500; a nonce issued to one worker is refused to another; two concurrent uses of one nonce
attest once; a quote for another worker's key is refused; a private run's replica tasks and
a private job's explain text never reach or leak to an unattested worker."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_api import JOIN_TOKEN, OP, OP_TOKEN, Api, TestClient, assert_error

from fleetkit import FakeClock, make_cap
from trainfleet.artifacts import ArtifactStore
from trainfleet.coordinator.app import create_app
from trainfleet.coordinator.state import Coordinator
from trainfleet.queue import JobQueue
from trainfleet.queue.sqlite import PostgresQueue
from trainfleet.verify.attest import (
    AttestationPolicy,
    AttestationRefused,
    PinnedKeyVerifier,
    SimulatedEnclave,
    b64encode,
    canonical_json,
    keygen,
    load_public_key,
)
from trainfleet.worker.attest import Attester

MEASUREMENT = "ab" * 32


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "keys")


def coordinator(
    tmp_path: Path, clock: FakeClock, queue: JobQueue, attestation: AttestationPolicy | None
) -> Iterator[Api]:
    coord = Coordinator(
        queue=queue,
        store=ArtifactStore(tmp_path / "artifacts"),
        staging_dir=tmp_path / "staging",
        operator_token=OP_TOKEN,
        join_token=JOIN_TOKEN,
        attestation=attestation,
    )
    with TestClient(create_app(coord)) as http:
        served = Api(http, coord, clock, tmp_path)
        try:
            yield served
        finally:
            served.close()


@pytest.fixture
def policy(keys: tuple[Path, Path]) -> AttestationPolicy:
    verifier = PinnedKeyVerifier([load_public_key(keys[1])], [MEASUREMENT])
    return AttestationPolicy(verifier, ttl_s=600.0)


@pytest.fixture
def api(
    tmp_path: Path,
    clock: FakeClock,
    make_queue: Callable[..., JobQueue],
    policy: AttestationPolicy,
) -> Iterator[Api]:
    """The app in-process on each queue backend (SQLite, PostgreSQL), attestation on."""
    yield from coordinator(tmp_path, clock, make_queue(), policy)


def attester(api: Api, keys: tuple[Path, Path]) -> Attester:
    return Attester(SimulatedEnclave(keys[0]), measurement=MEASUREMENT, wall=api.clock)


def nonce(api: Api, auth: dict[str, str]) -> str:
    r = api.http.post("/v1/attest/nonce", headers=auth)
    assert r.status_code == 200, r.text
    return str(r.json()["nonce"])


def test_an_issued_at_too_big_for_a_float_is_a_400_not_a_500(api: Api) -> None:
    worker = api.register()
    fields = {
        "enclave": "simulated",
        "issued_at": 10**400,
        "measurement": MEASUREMENT,
        "nonce": nonce(api, worker.auth),
        "worker_key": b64encode(b"k" * 32),
    }
    sig = "A" * 86
    body = {
        "quote": b64encode(canonical_json(fields)),
        "signature": sig,
        "worker_key": fields["worker_key"],
        "possession": sig,
    }
    r = api.http.post("/v1/attest", json=body, headers=worker.auth)
    assert assert_error(r, 400, "bad_request")["reason"] == "malformed"


def test_a_nonce_issued_to_worker_a_is_refused_to_worker_b(
    api: Api, keys: tuple[Path, Path]
) -> None:
    a, b = api.register("cpu-a"), api.register("cpu-b")
    att = attester(api, keys)
    body = att.body(nonce(api, a.auth))
    r = api.http.post("/v1/attest", json=body, headers=b.auth)
    assert assert_error(r, 403, "attestation_refused")["reason"] == "nonce_other_worker"
    r = api.http.post("/v1/attest", json=body, headers=a.auth)
    assert r.status_code == 200, r.text


def test_a_quote_for_another_workers_key_is_refused(api: Api, keys: tuple[Path, Path]) -> None:
    worker = api.register()
    mine, theirs = attester(api, keys), attester(api, keys)
    body = mine.body(nonce(api, worker.auth))
    body["worker_key"] = theirs.body("00" * 32)["worker_key"]
    r = api.http.post("/v1/attest", json=body, headers=worker.auth)
    assert assert_error(r, 403, "attestation_refused")["reason"] == "worker_key_mismatch"


def test_two_concurrent_uses_of_one_nonce_attest_once(api: Api, keys: tuple[Path, Path]) -> None:
    worker = api.register()
    body = attester(api, keys).body(nonce(api, worker.auth))
    statuses: list[int] = []
    start = threading.Barrier(4)

    def send() -> None:
        start.wait()
        statuses.append(api.http.post("/v1/attest", json=body, headers=worker.auth).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 403, 403, 403]


PRIVATE = """
[[jobs]]
name = "secret-training-of-acme"
tier = "private"
hyper = { steps = 5 }
"""


def test_a_private_job_never_reaches_an_unattested_worker_whose_host_re_registers(
    api: Api, keys: tuple[Path, Path]
) -> None:
    api.reload(PRIVATE)
    first = api.register("cpu-a")
    assert attester(api, keys).attest(api.client(first.token))
    api.coord.queue.revoke_worker(first.id)
    api.coord.tokens.clear()
    again = api.register("cpu-a")  # the same host, a new credential: unattested
    r = api.http.post("/v1/workers/claim", headers=again.auth)
    assert r.status_code == 200 and r.json()["claim"] is None, r.text
    assert api.coord.queue.get_job("secret-training-of-acme").state == "pending"


def test_a_worker_attested_on_one_coordinator_is_attested_on_another_sharing_postgres(
    api: Api, keys: tuple[Path, Path], tmp_path: Path, clock: FakeClock
) -> None:
    if not isinstance(api.coord.queue, PostgresQueue):
        pytest.skip("two coordinators share one database on PostgreSQL only")
    other = PostgresQueue(
        api.coord.queue.db.url, settings=api.coord.queue.settings, clock=clock, pool_size=2
    )
    try:
        for b in coordinator(tmp_path / "b", clock, other, None):
            api.reload(PRIVATE)
            worker = api.register("cpu-a")
            # On B, which pins no key, before any attestation: never handed the private job.
            r = b.http.post("/v1/workers/claim", headers=worker.auth)
            assert r.status_code == 200 and r.json()["claim"] is None, r.text
            body = attester(api, keys).body(nonce(api, worker.auth))
            # B pins no key: it refuses to attest, and A's nonce is useless there.
            r = b.http.post("/v1/attest", json=body, headers=worker.auth)
            assert assert_error(r, 403, "forbidden")["reason"] == "attestation_off"
            r = api.http.post("/v1/attest", json=body, headers=worker.auth)
            assert r.status_code == 200, r.text
            r = b.http.post("/v1/workers/claim", headers=worker.auth)  # the fact is shared
            assert r.json()["claim"]["job"]["name"] == "secret-training-of-acme", r.text
    finally:
        other.close()


def race(queues: tuple[JobQueue, JobQueue], worker_id: str, nonce: str, until: float) -> list[str]:
    """Both queues consume ``nonce`` at the same instant; what each got."""
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def use(queue: JobQueue) -> None:
        start.wait()
        try:
            queue.attest_worker(worker_id, nonce, MEASUREMENT, until)
            outcomes.append("ok")
        except AttestationRefused as err:
            outcomes.append(err.reason)

    threads = [threading.Thread(target=use, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_one_nonce_used_at_once_by_two_coordinators_attests_once(
    make_queue: Callable[..., JobQueue], clock: FakeClock
) -> None:
    """The database's guarantee, without the app: two queues (two coordinators on
    PostgreSQL; one queue's two connections on SQLite) consume one nonce at once."""
    first = make_queue()
    second = first
    if isinstance(first, PostgresQueue):
        second = PostgresQueue(first.db.url, clock=clock, pool_size=2)
    try:
        worker, _ = first.register_worker(make_cap("cpu-a"))
        for _ in range(5):
            nonce = first.attest_nonce(worker.id, 60.0)
            outcomes = race((first, second), worker.id, nonce, clock() + 600.0)
            assert sorted(outcomes) == ["ok", "replay"]
    finally:
        if second is not first:
            second.close()


def test_a_measurement_dropped_from_the_allowlist_ends_its_attestations(
    tmp_path: Path, clock: FakeClock, make_queue: Callable[..., JobQueue], keys: tuple[Path, Path]
) -> None:
    queue = make_queue()
    old = PinnedKeyVerifier([load_public_key(keys[1])], [MEASUREMENT])
    for before in coordinator(tmp_path, clock, queue, AttestationPolicy(old, ttl_s=600.0)):
        before.reload(PRIVATE)
        worker = before.register("cpu-a")
        assert attester(before, keys).attest(before.client(worker.token))
    new = PinnedKeyVerifier([load_public_key(keys[1])], ["cd" * 32])  # MEASUREMENT revoked
    for after in coordinator(tmp_path / "b", clock, queue, AttestationPolicy(new, ttl_s=600.0)):
        r = after.http.post("/v1/workers/claim", headers=worker.auth)
        assert r.status_code == 200 and r.json()["claim"] is None, r.text


@pytest.mark.parametrize(
    "raw",
    [
        b'{"quote": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"quote": "' + b"A" * 3_000_000 + b'"}',
        b'{"quote": "AAAA", "quote": "AAAA", "signature": "A", "worker_key": "A",'
        b' "possession": "A"}',
    ],
    ids=["deep", "huge", "duplicate-key"],
)
def test_hostile_attest_bodies_are_4xx_json(api: Api, raw: bytes) -> None:
    worker = api.register()
    headers = {**worker.auth, "content-type": "application/json"}
    r = api.http.post("/v1/attest", content=raw, headers=headers)
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/json")


def test_a_private_jobs_explain_text_is_not_for_workers(api: Api) -> None:
    api.reload(PRIVATE)
    worker = api.register("cpu-a")
    job_id = api.coord.queue.get_job("secret-training-of-acme").id
    r = api.http.get(f"/v1/jobs/{job_id}/explain", headers=worker.auth)
    assert r.status_code in (401, 403), r.text
    r = api.http.get(f"/v1/jobs/{job_id}/explain", headers=OP)
    assert r.status_code == 200 and "needs an attested worker" in r.text, r.text
