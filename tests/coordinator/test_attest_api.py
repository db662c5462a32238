"""The attestation endpoints, in-process: a worker attests through ``worker.attest.Attester``;
every refusal is a JSON 403 (400 when malformed) naming its reason, and only an attested
worker is handed a ``tier = "private"`` job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_api import Api, Worker, assert_error, serve

from fleetkit import FakeClock
from trainfleet.verify.attest import (
    AttestationPolicy,
    PinnedKeyVerifier,
    SimulatedEnclave,
    keygen,
    load_public_key,
)
from trainfleet.worker.attest import RENEW_BEFORE_S, Attester

MEASUREMENT = "ab" * 32
TTL_S = 600.0

PRIVATE_AND_PUBLIC = """
[[jobs]]
name = "secret"
tier = "private"
priority = 10
hyper = { steps = 5 }

[[jobs]]
name = "open"
hyper = { steps = 5 }
"""


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "keys")


@pytest.fixture
def api(tmp_path: Path, clock: FakeClock, keys: tuple[Path, Path]) -> Iterator[Api]:
    verifier = PinnedKeyVerifier([load_public_key(keys[1])], [MEASUREMENT])
    with serve(tmp_path, clock, attestation=AttestationPolicy(verifier, ttl_s=TTL_S)) as a:
        yield a


def attester(api: Api, keys: tuple[Path, Path], measurement: str = MEASUREMENT) -> Attester:
    return Attester(SimulatedEnclave(keys[0]), measurement=measurement, wall=api.clock)


def body_for(api: Api, worker: Worker, att: Attester) -> dict[str, Any]:
    """A complete, valid attestation request for ``worker`` (a fresh nonce)."""
    r = api.http.post("/v1/attest/nonce", headers=worker.auth)
    assert r.status_code == 200, r.text
    return att.body(r.json()["nonce"])


def claim_name(api: Api, worker: Worker) -> str | None:
    r = api.http.post("/v1/workers/claim", headers=worker.auth)
    assert r.status_code == 200, r.text
    claim = r.json()["claim"]
    return None if claim is None else str(claim["job"]["name"])


def test_an_attested_worker_gets_the_private_job_an_unattested_one_never(
    api: Api, keys: tuple[Path, Path]
) -> None:
    api.reload(PRIVATE_AND_PUBLIC)
    plain, attested = api.register("cpu-a"), api.register("cpu-b")
    assert claim_name(api, plain) == "open"  # the private job outranks it, yet is skipped
    assert claim_name(api, api.register("cpu-c")) is None
    att = attester(api, keys)
    assert att.attest(api.client(attested.token))
    assert not att.due()
    assert claim_name(api, attested) == "secret"
    detail = api.job("secret")
    assert detail["job"]["worker_id"] == attested.id
    assert {e["worker_id"] for e in detail["events"] if e["kind"] == "claimed"} == {attested.id}


def test_an_attestation_ends_at_attested_until(api: Api, keys: tuple[Path, Path]) -> None:
    api.reload(PRIVATE_AND_PUBLIC)
    worker = api.register("cpu-a")
    assert attester(api, keys).attest(api.client(worker.token))
    api.clock.advance(TTL_S + 1)
    assert claim_name(api, worker) == "open"  # expired: the private job waits
    assert claim_name(api, api.register("cpu-b")) is None


def test_a_replayed_quote_is_refused_as_a_replay(api: Api, keys: tuple[Path, Path]) -> None:
    worker = api.register()
    body = body_for(api, worker, attester(api, keys))
    ok = api.http.post("/v1/attest", json=body, headers=worker.auth)
    assert ok.status_code == 200, ok.text
    assert ok.json()["attested_until"] == api.clock() + TTL_S
    again = api.http.post("/v1/attest", json=body, headers=worker.auth)
    assert assert_error(again, 403, "attestation_refused")["reason"] == "replay"


def test_another_workers_quote_is_refused(api: Api, keys: tuple[Path, Path]) -> None:
    victim, thief = api.register("cpu-a"), api.register("cpu-b")
    body = body_for(api, victim, attester(api, keys))
    stolen = api.http.post("/v1/attest", json=body, headers=thief.auth)
    assert assert_error(stolen, 403, "attestation_refused")["reason"] == "nonce_other_worker"
    # The victim's nonce is still good: a refusal consumes nothing.
    assert api.http.post("/v1/attest", json=body, headers=victim.auth).status_code == 200


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda b, a: {**b, "worker_key": a.worker_key[:-2] + "AA"}, "worker_key_mismatch"),
        (lambda b, a: {**b, "possession": b["signature"]}, "bad_possession"),
        (lambda b, a: {**b, "signature": b["possession"]}, "bad_signature"),
    ],
)
def test_a_tampered_attestation_is_refused_with_its_reason(
    api: Api, keys: tuple[Path, Path], tamper: Any, reason: str
) -> None:
    worker = api.register()
    att = attester(api, keys)
    r = api.http.post(
        "/v1/attest", json=tamper(body_for(api, worker, att), att), headers=worker.auth
    )
    assert assert_error(r, 403, "attestation_refused")["reason"] == reason


def test_a_wrong_measurement_and_an_old_quote_are_refused(
    api: Api, keys: tuple[Path, Path]
) -> None:
    worker = api.register()
    wrong = attester(api, keys, measurement="ee" * 32)
    assert not wrong.attest(api.client(worker.token))
    assert wrong.refusal == "measurement_not_allowed"
    assert wrong.due() is False  # retries later, not in a loop
    body = body_for(api, worker, attester(api, keys))
    api.clock.advance(59)  # the nonce still lives; the quote is 59 s old: within 60
    assert api.http.post("/v1/attest", json=body, headers=worker.auth).status_code == 200
    body = body_for(api, worker, attester(api, keys))
    api.clock.advance(61)
    r = api.http.post("/v1/attest", json=body, headers=worker.auth)
    assert assert_error(r, 403, "attestation_refused")["reason"] == "nonce_expired"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"quote": "x", "signature": "y", "worker_key": "z"},  # possession missing
        {"quote": "a b", "signature": "y", "worker_key": "z", "possession": "p"},
        {"quote": "x" * 5000, "signature": "y", "worker_key": "z", "possession": "p"},
        {"quote": "x", "signature": "y", "worker_key": "z", "possession": "p", "extra": 1},
    ],
)
def test_malformed_bodies_are_a_400(api: Api, body: dict[str, Any]) -> None:
    worker = api.register()
    r = api.http.post("/v1/attest", json=body, headers=worker.auth)
    assert_error(r, 400, "bad_request")


def test_a_garbage_quote_is_malformed_not_a_500(api: Api) -> None:
    worker = api.register()
    sig = "A" * 86  # 64 bytes of base64url
    for quote in ("AAAA", "eyJ9", "W10"):
        body = {"quote": quote, "signature": sig, "worker_key": "A" * 43, "possession": sig}
        r = api.http.post("/v1/attest", json=body, headers=worker.auth)
        assert assert_error(r, 400, "bad_request")["reason"] == "malformed"


def test_only_workers_may_attest(api: Api) -> None:
    for path in ("/v1/attest/nonce", "/v1/attest"):
        assert_error(api.http.post(path, json={}), 401, "unauthorized")


def test_a_revoked_worker_loses_its_attestation(api: Api, keys: tuple[Path, Path]) -> None:
    api.reload(PRIVATE_AND_PUBLIC)
    worker = api.register()
    assert attester(api, keys).attest(api.client(worker.token))
    api.coord.queue.revoke_worker(worker.id)
    api.coord.tokens.clear()
    r = api.http.post("/v1/workers/claim", headers=worker.auth)
    assert_error(r, 401, "unauthorized")
    assert api.coord.queue.get_job("secret").state == "pending"


def test_attestation_off_says_so(tmp_path: Path, clock: FakeClock) -> None:
    with serve(tmp_path, clock) as api:
        worker = api.register()
        r = api.http.post("/v1/attest/nonce", headers=worker.auth)
        body = assert_error(r, 403, "forbidden")
        assert body["reason"] == "attestation_off" and "--attestation-key" in body["message"]


def test_a_worker_attests_again_before_its_attestation_ends(
    api: Api, keys: tuple[Path, Path]
) -> None:
    api.reload(PRIVATE_AND_PUBLIC)
    worker = api.register()
    att = Attester(
        SimulatedEnclave(keys[0]), measurement=MEASUREMENT, clock=api.clock, wall=api.clock
    )
    assert att.due()  # never attested
    assert att.attest(api.client(worker.token))
    api.clock.advance(TTL_S - RENEW_BEFORE_S - 1)
    assert not att.due()
    api.clock.advance(2)
    assert att.due()  # before the end: time to renew
    assert att.attest(api.client(worker.token))
    api.clock.advance(RENEW_BEFORE_S + 1)  # past the first attestation's end
    assert claim_name(api, worker) == "secret"
