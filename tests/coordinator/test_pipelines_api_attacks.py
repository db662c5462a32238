"""Attacks on the pipelines' HTTP API by an enrolled job that holds the pipeline secret: a
producer may not make consumers open a local directory or a non-HTTP address, and (a known
gap, see the xfail) a consumer can mint another job's attempt token from the shared secret."""

# ruff: noqa: F811  (the fixture ``started`` is imported, and named by the tests)
from __future__ import annotations

import pytest
from test_api import assert_error, bearer
from test_pipelines_api import Started, _quiet_driver, started  # noqa: F401 (fixtures)

from trainfleet.coordinator.auth import attempt_token


@pytest.mark.parametrize("store", ["dir:/etc", "file:///etc/passwd", "mem:x", "http://h/a?b"])
def test_a_producer_cannot_publish_a_ref_naming_a_foreign_store(
    started: Started, store: str
) -> None:
    ref = started.ref(0, store=store)
    body = assert_error(
        started.post("publish", {"refs": [ref]}, started.producer), 400, "bad_request"
    )
    assert "store" in body["message"] and started.producer.attach["secret"] not in body["message"]
    lease = started.post("lease", {"max_samples": 8}, started.consumers[0]).json()
    lease2 = started.post("lease", {"max_samples": 8}, started.consumers[1]).json()
    assert lease["samples"] == [] == lease2["samples"]  # nothing of it reached a consumer


def test_a_consumer_cannot_mint_the_producers_attempt_token(started: Started) -> None:
    p, c = started.producer, started.consumers[0]
    forged = attempt_token(c.attach["secret"], p.job_id, p.epoch)  # from the consumer's attach
    r = started.api.http.post(
        f"/v1/pipelines/{started.pipeline_id}/sync", json={"released": []}, headers=bearer(forged)
    )
    assert r.status_code == 401
