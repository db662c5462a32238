"""Bad input never gets a 500: body size counted while streaming, JSON and TOML nesting
bounded, query integers range-checked, path parameters validated and quoted, and uploads
checked as they stream (a fenced upload keeps no bytes; unbound blobs are collected).

Streaming cases run the ASGI app through ``httpx.ASGITransport`` with a generator body that
counts how much of it the app pulled, so "refused before it was read whole" is observable.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from test_api import JOIN_TOKEN, ONE_JOB, OP, OP_TOKEN, SWEEP, Api, Worker, assert_error

from trainfleet.artifacts import IngestBuffer
from trainfleet.artifacts import store as store_module
from trainfleet.artifacts.gc import collect_garbage
from trainfleet.coordinator.bodies import MAX_JSON_BYTES
from trainfleet.errors import NotFound

MiB = 1024 * 1024


class Pulled:
    """An async body of ``chunks`` chunks that counts how many the app pulled."""

    def __init__(self, chunks: int, chunk: bytes, on_pull: Any = None) -> None:
        self.chunks, self.chunk, self.pulled, self.on_pull = chunks, chunk, 0, on_pull

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            if self.on_pull:
                self.on_pull(self.pulled)
            yield self.chunk


def asgi(api: Api, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to the app through httpx's ASGI transport (streams the body lazily)."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=api.http.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await c.request(method, path, **kwargs)

    return asyncio.run(go())


# body size ------------------------------------------------------------------------------------


def test_a_chunked_json_body_over_the_limit_is_refused_while_streaming(api: Api) -> None:
    body = Pulled(64, b" " * MiB)  # 64 MiB of whitespace, no Content-Length
    r = asgi(api, "POST", "/v1/manifest", content=body, headers=OP)
    assert_error(r, 413, "payload_too_large")
    assert body.pulled <= MAX_JSON_BYTES // MiB + 1, "the body was read past the limit"


def test_a_declared_content_length_over_the_limit_is_refused_unread(api: Api) -> None:
    body = Pulled(64, b" " * MiB)
    headers = {**OP, "Content-Length": str(64 * MiB)}
    r = asgi(api, "POST", "/v1/manifest", content=body, headers=headers)
    body_json = assert_error(r, 413, "payload_too_large")
    assert body_json["limit_bytes"] == MAX_JSON_BYTES
    assert body.pulled == 0


def _bodied_endpoints() -> list[tuple[str, str, str]]:
    from trainfleet.coordinator.app import api_routes

    subst = {"{job_id}": "alpha", "{sha256}": "0" * 64, "{fit_id}": "0" * 64, "{name}": "cpu-a"}
    out = []
    for ep in api_routes().endpoints:
        if ep.body or ep.raw_body:
            path = ep.path
            for key, value in subst.items():
                path = path.replace(key, value)
            out.append((ep.method, path, ep.auth))
    return out


@pytest.mark.parametrize(("method", "path", "auth"), _bodied_endpoints())
def test_a_wrong_token_is_refused_before_the_body_is_read(
    api: Api, method: str, path: str, auth: str
) -> None:
    """An unauthenticated caller cannot make the coordinator read (or parse) a body."""
    assert auth != "none"
    body = Pulled(16, b"{" * MiB)  # 16 MiB of invalid JSON
    r = asgi(api, method, path, content=body, headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, "unauthorized")
    assert body.pulled == 0, "the body was read before the token was checked"


def test_register_checks_every_kind_of_join_token_before_the_body(api: Api) -> None:
    revoked = api.coord.queue.enroll_host("gone")
    api.coord.queue.revoke_host("gone")
    rotated = api.coord.queue.enroll_host("moved")
    api.coord.queue.rotate_host("moved")
    # The shared token outside open mode, the operator token, a revoked and a rotated one.
    for token in (JOIN_TOKEN, OP_TOKEN, revoked, rotated):
        body = Pulled(16, b"{" * MiB)
        headers = {"Authorization": f"Bearer {token}"}
        r = asgi(api, "POST", "/v1/workers/register", content=body, headers=headers)
        assert_error(r, 401, "unauthorized")
        assert body.pulled == 0, token
    assert api.coord.queue.list_workers() == []


# nesting depth --------------------------------------------------------------------------------


DEEP = 50_000


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * DEEP + b"]" * DEEP,
        b'{"epoch": 1, "result": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}",
        b"[" * DEEP,  # not even valid JSON: still a 400, never a RecursionError
    ],
    ids=["array", "object", "unclosed"],
)
def test_a_deeply_nested_json_body_is_a_400(api: Api, raw: bytes) -> None:
    worker, job_id = api.claimed()
    for path, headers in (
        ("/v1/manifest", OP),
        (f"/v1/jobs/{job_id}/complete", worker.auth),
        (f"/v1/jobs/{job_id}/heartbeat", worker.auth),
    ):
        r = api.http.post(path, content=raw, headers=headers)
        body = assert_error(r, 400, "bad_request")
        assert "nests deeper than" in body["message"]
    assert api.job(job_id)["job"]["state"] == "claimed"


def test_nesting_within_the_bound_is_accepted(api: Api) -> None:
    worker, job_id = api.claimed()
    result = {"deep": [[[[{"a": [1]}]]]], "text": "[[[[" * 100}  # brackets in strings
    r = api.http.post(
        f"/v1/jobs/{job_id}/complete", json={"epoch": 1, "result": result}, headers=worker.auth
    )
    assert r.status_code == 200, r.text
    assert r.json()["result"]["deep"] == result["deep"]


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * DEEP + "]" * DEEP,
        "x = " + "{a = " * DEEP + "1" + "}" * DEEP,
        "a" + ".a" * DEEP + " = 1",  # dotted keys: deep without brackets
        "[" + ".".join(["t"] * DEEP) + "]\nx = 1",
    ],
    ids=["arrays", "inline-tables", "dotted-keys", "table-header"],
)
def test_a_deeply_nested_manifest_is_a_400(api: Api, text: str) -> None:
    r = api.http.post("/v1/manifest", json={"text": text}, headers=OP)
    body = assert_error(r, 400, "bad_request")
    assert "nests deeper than" in body["message"]


def test_non_finite_numbers_are_not_json(api: Api) -> None:
    worker, job_id = api.claimed()
    r = api.http.post(
        f"/v1/jobs/{job_id}/complete",
        content=b'{"epoch": 1, "result": {"loss": NaN}}',
        headers=worker.auth,
    )
    body = assert_error(r, 400, "bad_request")
    assert "NaN" in body["message"] and "null" in body["message"]


# query and path parameters --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "word"),
    [
        ({"after": str(2**63)}, "between"),
        ({"after": "-1"}, "between"),
        ({"after": "1e3"}, "integer"),
        ({"limit": "0"}, "between"),
        ({"limit": "10001"}, "between"),
        ({"after": "٣"}, "integer"),  # a non-ASCII digit int() would accept
    ],
)
def test_query_integers_are_range_checked(api: Api, query: dict[str, str], word: str) -> None:
    api.reload(ONE_JOB)
    r = api.http.get("/v1/jobs/solo/logs", params=query, headers=OP)
    body = assert_error(r, 400, "bad_request")
    assert word in body["message"]
    assert next(iter(query)) in body["message"]


def test_query_strings_are_checked_against_their_declaration(api: Api) -> None:
    body = assert_error(api.http.get("/v1/jobs?state=bogus", headers=OP), 400, "bad_request")
    assert "pending" in body["message"]


@pytest.mark.parametrize(
    "path",
    ["/v1/artifacts/ABC", f"/v1/artifacts/{'A' * 64}", "/v1/routers/not-a-fit-id"],
)
def test_path_parameters_are_checked_against_their_pattern(api: Api, path: str) -> None:
    body = assert_error(api.http.get(path, headers=OP), 400, "bad_request")
    assert "path parameter" in body["message"]


def test_an_empty_job_reference_is_refused(api: Api) -> None:
    for path in ("/v1/jobs//logs", "/v1/jobs/", "/v1/jobs//explain"):
        assert_error(api.http.get(path, headers=OP, follow_redirects=False), 404, "not_found")
    with pytest.raises(ValueError, match="empty job reference"):
        api.client("op-token").job("")
    with pytest.raises(ValueError, match="empty job reference"):
        api.client("op-token").cancel("  ")


@pytest.mark.parametrize("ref", ["a/b", "x?y=1", "frag#ment", "with space", "solo/logs", "%41"])
def test_job_references_are_quoted_end_to_end(api: Api, ref: str) -> None:
    api.reload(ONE_JOB)
    operator = api.client("op-token")
    for call in (operator.job, operator.logs, operator.explain, operator.cancel):
        with pytest.raises(NotFound) as info:
            call(ref)
        assert repr(ref) in str(info.value)  # the server saw the whole reference
    assert operator.job("solo")["job"]["name"] == "solo"
    r = api.http.get(f"/v1/jobs/{quote('solo', safe='')}/logs", headers=OP)
    assert r.status_code == 200


# the description ------------------------------------------------------------------------------


def test_openapi_declares_every_parameter_and_error(api: Api) -> None:
    spec = api.http.get("/openapi.json").json()
    paths = spec["paths"]

    def params(path: str, method: str) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in paths[path][method].get("parameters", [])}

    logs = params("/v1/jobs/{job_id}/logs", "get")
    assert logs["after"]["schema"] == {
        "type": "integer",
        "minimum": 0,
        "maximum": 2**63 - 1,
        "default": 0,
    }
    assert logs["limit"]["schema"]["maximum"] == 10_000
    assert logs["job_id"]["in"] == "path" and logs["job_id"]["schema"]["minLength"] == 1
    assert "pending" in params("/v1/jobs", "get")["state"]["schema"]["enum"]
    upload = params("/v1/jobs/{job_id}/artifacts/{sha256}", "put")
    assert {"epoch", "size", "name"} <= set(upload)
    assert upload["epoch"]["required"] is True
    assert upload["sha256"]["schema"]["pattern"] == "^[0-9a-f]{64}$"
    assert params("/v1/routers/{fit_id}", "get")["fit_id"]["schema"]["pattern"]
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, ops in paths.items():
        for method, op in ops.items():
            assert op["operationId"], (path, method)
            for p in op.get("parameters", []):
                assert p["description"], (path, method, p["name"])
                if p["in"] == "path":
                    assert p["schema"].get("pattern"), (path, p["name"])
            codes = set(op["responses"])
            assert "default" not in codes, (path, method)
            assert "400" in codes
            if op.get("security"):
                assert "401" in codes, (path, method)
            for code in {c for c in codes if not c.startswith("2")}:
                content = op["responses"][code]["content"]["application/json"]
                assert content["schema"] == error_ref, (path, method, code)
    claim = paths["/v1/workers/claim"]["post"]["responses"]["200"]
    link = claim["links"]["ClaimedJob"]
    assert link["operationId"] == "job_detail"
    assert link["parameters"] == {"job_id": "$response.body#/claim/job/id"}
    operation_ids = {op["operationId"] for ops in paths.values() for op in ops.values()}
    assert {target["operationId"] for target in claim["links"].values()} <= operation_ids
    assert len(operation_ids) == sum(len(ops) for ops in paths.values())  # unique
    assert paths["/v1/workers/deregister"]["post"]["responses"]["204"]


# uploads --------------------------------------------------------------------------------------


def upload_path(job_id: str, sha: str) -> str:
    return f"/v1/jobs/{job_id}/artifacts/{sha}"


def test_an_upload_longer_than_declared_is_refused_as_it_passes_the_size(
    api: Api, running: tuple[Worker, str]
) -> None:
    worker, job_id = running
    body = Pulled(100, b"x" * 1000)  # 100 kB streamed, 1.5 kB declared
    params = {"epoch": 1, "size": 1500}
    r = asgi(api, "PUT", upload_path(job_id, "a" * 64), content=body, params=params,
             headers=worker.auth)  # fmt: skip
    assert_error(r, 422, "integrity_error")
    assert body.pulled == 2
    assert list(api.coord.staging_dir.iterdir()) == []


def test_an_upload_whose_content_length_disagrees_is_refused_unread(
    api: Api, running: tuple[Worker, str]
) -> None:
    worker, job_id = running
    body = Pulled(10, b"x" * 1000)
    headers = {**worker.auth, "Content-Length": "10000"}
    r = asgi(api, "PUT", upload_path(job_id, "a" * 64), content=body,
             params={"epoch": 1, "size": 5}, headers=headers)  # fmt: skip
    assert_error(r, 422, "integrity_error")
    assert body.pulled == 0


def test_an_upload_is_hashed_once_while_streaming(
    api: Api, running: tuple[Worker, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, job_id = running

    def no_second_pass(*_: Any) -> Any:
        raise AssertionError("the staged file was read again to hash it")

    monkeypatch.setattr(store_module, "sha256_file", no_second_pass)
    data = os.urandom(3 * MiB)
    sha = hashlib.sha256(data).hexdigest()
    r = api.upload(worker, job_id, 1, data)
    assert r.status_code == 200, r.text
    assert api.coord.store.read_bytes(sha) == data
    assert list(api.coord.staging_dir.iterdir()) == []  # moved into the store


def test_a_fenced_upload_leaves_no_stored_bytes(api: Api, running: tuple[Worker, str]) -> None:
    """The epoch goes stale while the body streams: the bind refuses it (409) and the bytes
    just stored are removed again."""
    worker, job_id = running
    chunk = os.urandom(64 * 1024)
    data = chunk * 4
    sha = hashlib.sha256(data).hexdigest()

    def requeue_midway(pulled: int) -> None:
        if pulled == 2:
            api.coord.queue.requeue(job_id)

    body = Pulled(4, chunk, on_pull=requeue_midway)
    r = asgi(api, "PUT", upload_path(job_id, sha), content=body,
             params={"epoch": 1, "size": len(data)}, headers=worker.auth)  # fmt: skip
    assert_error(r, 409, "stale_epoch")
    assert body.pulled == 4  # the stale epoch was found at bind time, after streaming
    assert not api.coord.store.exists(sha)
    assert list(api.coord.staging_dir.iterdir()) == []
    assert api.coord.queue.artifacts(job_id) == []


def test_unbound_blobs_are_collected_after_the_grace_period(
    api: Api, running: tuple[Worker, str], tmp_path: Path
) -> None:
    worker, job_id = running
    bound = b"bound artifact"
    assert api.upload(worker, job_id, 1, bound).status_code == 200
    orphan = b"an upload that was never bound"
    with IngestBuffer(tmp_path / "stage") as buf:
        buf.write(orphan)
        api.coord.store.commit_ingested(buf, hashlib.sha256(orphan).hexdigest(), len(orphan))
    store, queue = api.coord.store, api.coord.queue
    assert collect_garbage(store, queue, grace_s=3600) == []  # both are young
    old = time.time() - 7200
    for sha in (hashlib.sha256(bound).hexdigest(), hashlib.sha256(orphan).hexdigest()):
        os.utime(store.fs._strip_protocol(store.url_for(sha)), (old, old))
    assert collect_garbage(store, queue, grace_s=3600) == [hashlib.sha256(orphan).hexdigest()]
    assert store.exists(hashlib.sha256(bound).hexdigest())
    assert not store.exists(hashlib.sha256(orphan).hexdigest())


def test_every_endpoint_answers_garbage_with_a_4xx(api: Api) -> None:
    """A cheap sweep before the fuzzer: odd bodies and parameters on every route."""
    api.reload(SWEEP)
    worker = api.register()
    spec = api.http.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        concrete = path.replace("{job_id}", "alpha").replace("{sha256}", "0" * 64)
        concrete = concrete.replace("{fit_id}", "0" * 64).replace("{name}", "cpu-a")
        for method in ops:
            for headers in (OP, worker.auth, {}):
                for content in (b"", b"null", b"[]", b'"x"', b"{", b"\xff\xfe", b"1e999999"):
                    r = api.http.request(
                        method.upper(), concrete, content=content, headers=headers,
                        params={"after": "x", "epoch": "0", "size": "-1"},
                    )  # fmt: skip
                    assert r.status_code < 500, (method, concrete, content, r.text)


def test_a_full_coordinator_disk_is_a_507_and_nothing_is_kept(
    api: Api, running: tuple[Worker, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, job_id = running

    def disk_full(self: IngestBuffer, chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IngestBuffer, "write", disk_full)
    body = assert_error(api.upload(worker, job_id, 1, b"some bytes"), 507, "insufficient_storage")
    assert "retry later" in body["message"]
    assert list(api.coord.staging_dir.iterdir()) == []
    assert api.coord.queue.artifacts(job_id) == []


def test_abandoned_staging_files_are_collected(api: Api, tmp_path: Path) -> None:
    staging = api.coord.staging_dir
    old, fresh = staging / "upload-old.part", staging / "upload-new.part"
    old.write_bytes(b"left by a crash")
    fresh.write_bytes(b"an upload in progress")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    collect_garbage(api.coord.store, api.coord.queue, grace_s=3600, staging_dir=staging)
    assert not old.exists() and fresh.exists()
