"""The HTTP data plane: authentication, bounded and validated requests, JSON refusals, and a
client that catches a dead or lying server. (The FeatureStore contract runs over HTTP too:
``conftest.BACKENDS["http"]``.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from featurekit import SECRET, resign, same, sample
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from trainfleet.errors import (
    BadRef,
    FeatureAuthError,
    FeatureError,
    HashMismatch,
    SampleGone,
    StaleGeneration,
    StoreUnavailable,
)
from trainfleet.features import InProcessStore, SampleRef, SharedDirStore, open_store
from trainfleet.features.http import (
    MAX_REF_BYTES,
    FeatureServer,
    HttpStore,
    ThreadedServer,
    bearer,
)


@pytest.fixture
def served() -> Iterator[tuple[InProcessStore, FeatureServer]]:
    store = InProcessStore(secret=SECRET)
    server = FeatureServer(store, SECRET).start()
    try:
        yield store, server
    finally:
        server.stop()
        store.close()


@pytest.fixture
def raw(served: tuple[InProcessStore, FeatureServer]) -> Iterator[httpx.Client]:
    """A plain HTTP client to the server, without credentials."""
    with httpx.Client(base_url=served[1].address, timeout=10) as client:
        yield client


def _refusal(reply: httpx.Response, status: int, code: str | None = None) -> dict[str, str]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"error", "message", "reason"}
    if code is not None:
        assert body["error"] == code
    return body


def test_refs_name_the_server_and_a_consumer_gets_releases_retains(
    served: tuple[InProcessStore, FeatureServer],
) -> None:
    store, server = served
    assert server.address.startswith("http://127.0.0.1:") and store.address == server.address
    ref = store.put("a", sample(), holders=1)
    assert ref.store == server.address
    with open_store(ref.store, SECRET) as consumer:
        assert isinstance(consumer, HttpStore)
        assert same(consumer.get(ref), sample())
        consumer.retain(ref)
        assert consumer.release(ref) is False
        assert consumer.release(ref) is True
        with pytest.raises(SampleGone) as e:
            consumer.get(ref)
        assert e.value.reason == "released"
        health = consumer.health()
        assert health["ok"] is True and health["stats"]["gets"] == 1
        assert health["stats"]["released"] == 1
        stats = consumer.stats()
        assert (stats.gets, stats.released) == (1, 1)


def test_a_served_shared_dir_store_sends_its_private_buffer(tmp_path: Path) -> None:
    store = SharedDirStore(tmp_path / "d", secret=SECRET)
    server = FeatureServer(store, SECRET).start()
    try:
        ref = store.put("a", sample(3), holders=2)
        assert ref.store == server.address
        with HttpStore(server.address, SECRET) as consumer:
            assert same(consumer.get(ref), sample(3))
            assert consumer.release(ref) is False
            assert same(store.get(ref), sample(3))
    finally:
        server.stop()
        store.close()


def test_every_request_needs_the_secret(
    served: tuple[InProcessStore, FeatureServer], raw: httpx.Client
) -> None:
    store, _ = served
    ref = store.put("a", sample())
    body = ref.model_dump_json()
    wrong = bearer(b"another pipeline's secret")
    refused: list[dict[bytes, bytes]] = [
        {},
        {b"authorization": wrong.encode()},
        {b"authorization": b"Bearer"},
        {b"authorization": SECRET.hex().encode()},  # no scheme
        {b"authorization": b"Bearer \xe9\xff"},  # not ASCII
    ]
    for headers in refused:
        for path in ("/v1/get", "/v1/release", "/v1/retain"):
            _refusal(raw.post(path, content=body, headers=headers), 401, "feature_auth")
        _refusal(raw.get("/health", headers=headers), 401, "feature_auth")
    assert same(store.get(ref), sample())  # nothing was released or retained
    assert store.release(ref) is True
    with HttpStore(store.address, b"another pipeline's secret") as other:
        with pytest.raises(BadRef):  # its MAC check runs first, locally
            other.get(ref)
        with pytest.raises(FeatureAuthError):
            other.health()


def test_a_server_with_another_secret_refuses_a_valid_ref() -> None:
    store = InProcessStore(secret=SECRET)
    server = FeatureServer(store, b"the server's own secret").start()
    try:
        ref = store.put("a", sample())
        with HttpStore(server.address, SECRET) as consumer, pytest.raises(FeatureAuthError):
            consumer.get(ref)
    finally:
        server.stop()
        store.close()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b"null",
        b'{"store": "x"}',
        b"[" * 3000,
        b'{"a":' * 500 + b"1" + b"}" * 500,
        "\u00e9".encode("latin-1"),
    ],
)
def test_malformed_bodies_are_400_json(
    served: tuple[InProcessStore, FeatureServer], raw: httpx.Client, body: bytes
) -> None:
    headers = {"authorization": bearer(SECRET)}
    for path in ("/v1/get", "/v1/release", "/v1/retain"):
        _refusal(raw.post(path, content=body, headers=headers), 400, "bad_request")


def test_a_ref_with_an_unknown_field_or_bad_values_is_400(
    served: tuple[InProcessStore, FeatureServer], raw: httpx.Client
) -> None:
    store, _ = served
    ref = store.put("a", sample())
    headers = {"authorization": bearer(SECRET)}
    for change in (
        {"extra": 1},
        {"generation": 0},
        {"key": "../x"},
        {"size": -1},
        {"digest": "XYZ"},
    ):
        fields = {**ref.model_dump(), **change}
        reply = raw.post("/v1/get", content=json.dumps(fields), headers=headers)
        _refusal(reply, 400, "bad_request")


def test_store_refusals_map_to_their_status_and_class(
    served: tuple[InProcessStore, FeatureServer], raw: httpx.Client
) -> None:
    store, _ = served
    headers = {"authorization": bearer(SECRET)}
    old = store.put("s", sample(1), key="k")
    new = store.put("s", sample(2), key="k")
    forged = resign(new, secret=b"x")
    cases = [
        (old, 409, "stale_generation"),
        (forged, 422, "bad_ref"),
        (resign(new, size=new.size + 1), 422, "hash_mismatch"),
        (resign(new, key="never-put"), 410, "sample_gone"),
    ]
    for ref, status, code in cases:
        _refusal(raw.post("/v1/get", content=ref.model_dump_json(), headers=headers), status, code)
    store.abort(new)
    body = _refusal(raw.post("/v1/get", content=new.model_dump_json(), headers=headers), 410)
    assert body["reason"] == "aborted"
    with HttpStore(store.address, SECRET) as consumer:
        with pytest.raises(StaleGeneration):
            consumer.get(old)
        with pytest.raises(SampleGone) as e:
            consumer.retain(new)
        assert e.value.reason == "aborted"


def test_routes_and_methods_not_served_are_json(raw: httpx.Client) -> None:
    headers = {"authorization": bearer(SECRET)}
    _refusal(raw.get("/v1/get", headers=headers), 405, "method_not_allowed")
    _refusal(raw.post("/v1/put", content=b"{}", headers=headers), 404, "not_found")


def test_an_oversize_body_is_refused(
    served: tuple[InProcessStore, FeatureServer], raw: httpx.Client
) -> None:
    headers = {"authorization": bearer(SECRET)}
    big = b'{"store": "' + b"x" * MAX_REF_BYTES + b'"}'
    _refusal(raw.post("/v1/get", content=big, headers=headers), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(8):
            yield b" " * 1024

    _refusal(raw.post("/v1/release", content=chunks(), headers=headers), 413)
    assert served[0].stats().released == 0


def test_put_and_abort_are_the_producers_alone(
    served: tuple[InProcessStore, FeatureServer],
) -> None:
    store, server = served
    ref = store.put("a", sample())
    with HttpStore(server.address, SECRET) as consumer:
        with pytest.raises(FeatureError) as e:
            consumer.put("b", sample())
        assert e.value.reason == "read_only"
        with pytest.raises(FeatureError):
            consumer.abort(ref)
        assert consumer.collect() == 0
    assert same(store.get(ref), sample())


def test_a_stopped_server_is_store_unavailable(
    served: tuple[InProcessStore, FeatureServer],
) -> None:
    store, server = served
    ref = store.put("a", sample())
    consumer = HttpStore(server.address, SECRET, timeout_s=5)
    try:
        assert same(consumer.get(ref), sample())
        server.stop()
        for call in (consumer.get, consumer.release, consumer.retain):
            with pytest.raises(StoreUnavailable):
                call(ref)
    finally:
        consumer.close()
    with pytest.raises(StoreUnavailable):
        consumer.get(ref)  # closed


_CHILD = """
import sys, torch
from trainfleet.features import InProcessStore
from trainfleet.features.http import FeatureServer
secret = bytes.fromhex(sys.argv[1])
store = InProcessStore(secret=secret)
server = FeatureServer(store, secret).start()
print(store.put("a", {"x": torch.arange(1000)}).model_dump_json(), flush=True)
sys.stdin.read()
"""


def test_a_killed_producer_process_is_store_unavailable() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, SECRET.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            ref = SampleRef.model_validate_json(child.stdout.readline())
            with HttpStore(ref.store, SECRET, timeout_s=5) as consumer:
                assert consumer.get(ref)["x"].sum().item() == sum(range(1000))
                os.kill(child.pid, signal.SIGKILL)
                child.wait(30)
                with pytest.raises(StoreUnavailable):
                    consumer.get(ref)
                with pytest.raises(StoreUnavailable):
                    consumer.release(ref)
        finally:
            child.kill()
            child.wait(30)


class _FlipsAByte(InProcessStore):
    """A producer whose memory went bad: it serves its bytes with one bit flipped."""

    def _read(self, key: str, generation: int, size: int) -> bytes:
        data = bytearray(super()._read(key, generation, size))
        data[-1] ^= 1
        return bytes(data)


def test_a_server_serving_other_bytes_is_caught_by_the_client() -> None:
    store = _FlipsAByte(secret=SECRET)
    server = FeatureServer(store, SECRET).start()
    try:
        ref = store.put("a", sample())
        with HttpStore(server.address, SECRET) as consumer, pytest.raises(HashMismatch) as e:
            consumer.get(ref)
        assert e.value.reason == "digest"
    finally:
        server.stop()
        store.close()


@pytest.mark.parametrize("lie", ["longer", "longer_undeclared", "shorter", "not_a_server"])
def test_a_lying_server_is_caught_by_the_client(lie: str) -> None:
    honest = InProcessStore(secret=SECRET, address="http://127.0.0.1:1")
    truth = sample()

    async def get(request: Request) -> Response:
        ref = SampleRef.model_validate_json(await request.body())
        data = bytes(honest._read(ref.key, ref.generation, ref.size))
        if lie == "longer":
            return Response(data + b"\0" * 4096, media_type="application/octet-stream")
        if lie == "longer_undeclared":

            async def stream() -> AsyncIterator[bytes]:
                yield data
                yield b"\0" * 4096

            return StreamingResponse(stream())
        if lie == "shorter":
            return Response(data[:-10], media_type="application/octet-stream")
        return Response(b"<html>hello</html>", status_code=502)

    async def release(request: Request) -> Response:  # a 4 MiB "JSON" reply
        async def stream() -> AsyncIterator[bytes]:
            yield b'{"freed": true, "x": "'
            for _ in range(64):
                yield b"x" * 65536
            yield b'"}'

        return StreamingResponse(stream(), media_type="application/json")

    app = Starlette(
        routes=[
            Route("/v1/get", get, methods=["POST"]),
            Route("/v1/release", release, methods=["POST"]),
        ]
    )
    server = ThreadedServer(app)
    server.start()
    try:
        honest.address = f"http://127.0.0.1:{server.port}"
        ref = honest.put("a", truth)
        with HttpStore(honest.address, SECRET, timeout_s=10) as consumer:
            want = StoreUnavailable if lie == "not_a_server" else HashMismatch
            with pytest.raises(want):
                consumer.get(ref)
            with pytest.raises(StoreUnavailable) as e:  # read up to a bound, not forever
                consumer.release(ref)
            assert e.value.reason == "bad_reply"
    finally:
        server.stop()
        honest.close()
