"""The fault proxy itself, against a live coordinator: a dropped reply still commits, a
partition is a prompt transport error, a delay delays, and bodies of every framing pass."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fleetkit import make_cap
from trainfleet.client import Client
from trainfleet.errors import CoordinatorUnavailable
from trainfleet.testing import FaultProxy, LiveFleet

JOB = '[[jobs]]\nname = "j"\nkind = "command"\ncommand = ["true"]\n'


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    with LiveFleet(tmp_path, heartbeat_interval_s=0.5, heartbeat_timeout_s=30.0) as live:
        yield live


@pytest.fixture
def proxy(fleet: LiveFleet) -> Iterator[FaultProxy]:
    with FaultProxy(fleet.url) as p:
        yield p


def worker_client(fleet: LiveFleet, proxy: FaultProxy, host: str = "px") -> Client:
    with Client(proxy.url, fleet.worker_token(host), timeout_s=10) as joiner:
        token = joiner.register(make_cap(host).model_dump(mode="json"))["token"]
    return Client(proxy.url, token, timeout_s=10)


def test_a_dropped_claim_reply_is_committed_but_never_seen(
    fleet: LiveFleet, proxy: FaultProxy
) -> None:
    fleet.reload(JOB)
    worker = worker_client(fleet, proxy)
    proxy.drop_reply("POST", r"/claim$", times=1)
    with pytest.raises(CoordinatorUnavailable):
        worker.claim()
    dropped = proxy.wait_for("POST", r"/claim$", timeout_s=5, fault="dropped")
    assert dropped.status == 200  # the coordinator answered: the claim is on record
    job = fleet.job("j")["job"]
    assert job["state"] == "claimed" and job["epoch"] == 1
    # The rule was used up: the next request on a fresh connection goes through.
    assert worker.heartbeat(job["id"], 1) is not None
    assert proxy.wait_for("POST", r"/heartbeat$", timeout_s=5).status == 200
    worker.close()


def test_a_partition_is_a_prompt_transport_error_until_healed(
    fleet: LiveFleet, proxy: FaultProxy
) -> None:
    client = Client(proxy.url, fleet.coord.operator_token, timeout_s=30)
    assert client.status() is not None  # a pooled keep-alive connection now exists
    proxy.partition()
    started = time.monotonic()
    for _ in range(3):  # the open connection is cut, new ones are reset
        with pytest.raises(CoordinatorUnavailable):
            client.status()
    assert time.monotonic() - started < 5  # an error, not a hang until the 30 s timeout
    assert proxy.refused_connections >= 1
    proxy.heal()
    assert client.status() is not None
    assert len(proxy.seen("GET", r"/status$")) == 2
    client.close()


def test_delay_holds_the_request_before_forwarding(fleet: LiveFleet, proxy: FaultProxy) -> None:
    client = Client(proxy.url, fleet.coord.operator_token)
    proxy.delay("GET", r"/v1/jobs$", seconds=1.0, times=1)
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        listed = pool.submit(client.jobs)
        proxy.wait_arrival("GET", r"/v1/jobs$", timeout_s=5)  # held in the proxy now
        assert not proxy.seen("GET", r"/v1/jobs$") and not listed.done()
        assert listed.result(timeout=10) == []
    assert time.monotonic() - started >= 1.0
    assert proxy.wait_for("GET", r"/v1/jobs$", timeout_s=5).fault == "delayed"
    started = time.monotonic()
    client.jobs()  # used up: no delay the second time
    assert time.monotonic() - started < 1.0
    client.close()


def test_keep_alive_chunked_and_sized_bodies_pass_intact(
    fleet: LiveFleet, proxy: FaultProxy
) -> None:
    headers = {"Authorization": f"Bearer {fleet.coord.operator_token}"}
    body = httpx.Request("POST", "/", json={"text": JOB, "path": "m.toml"}).read()
    dry_body = httpx.Request("POST", "/", json={"text": JOB, "path": "m.toml", "dry_run": True})

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    with httpx.Client(base_url=proxy.url, headers=headers, timeout=10) as http:
        sized = http.post("/v1/manifest", content=dry_body.read())
        chunked = http.post("/v1/manifest", content=chunks())  # Transfer-Encoding: chunked
        listed = http.get("/v1/jobs")
    assert sized.status_code == 200 and chunked.status_code == 200, chunked.text
    assert [j["name"] for j in listed.json()["jobs"]] == ["j"]
    assert [(e.method, e.status) for e in proxy.seen()] == [
        ("POST", 200),
        ("POST", 200),
        ("GET", 200),
    ]


def test_wait_for_times_out_with_what_it_saw(proxy: FaultProxy) -> None:
    with pytest.raises(AssertionError, match="saw 0"):
        proxy.wait_for("POST", r"/claim$", timeout_s=0.2)
