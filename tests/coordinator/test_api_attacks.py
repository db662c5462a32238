"""What a malicious or broken worker can send, and what it must never achieve: text SQLite
cannot store (a 500), an unbounded result or log, names that are terminal escapes, and a
fenced upload deleting bytes another attempt is binding.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_api import OP, SWEEP, Api, Worker, assert_error, serve
from test_api_limits import Pulled, asgi, upload_path

from fleetkit import FakeClock
from trainfleet.artifacts import IngestBuffer, space
from trainfleet.artifacts.gc import collect_garbage
from trainfleet.coordinator.routes_worker import (
    MAX_ARTIFACTS_PER_ATTEMPT,
    MAX_RESULT_BYTES,
    WORKER_LIMITS,
)
from trainfleet.errors import InsufficientStorage
from trainfleet.queue import log_quota
from trainfleet.queue.sqlite_attempts import MAX_LOG_LINE_CHARS

JSON = {"content-type": "application/json"}


def post(api: Api, worker: Worker, path: str, raw: bytes) -> httpx.Response:
    return api.http.post(path, content=raw, headers={**worker.auth, **JSON})


# text SQLite and JSON cannot hold -------------------------------------------------------------


@pytest.mark.parametrize(
    "route, raw",
    [
        ("logs", b'{"epoch": 1, "lines": ["ok", "\\ud800 lone high"]}'),
        ("logs", b'{"epoch": 1, "lines": ["\\udfff"]}'),
        ("fail", b'{"epoch": 1, "error": "\\udc80"}'),
        ("complete", b'{"epoch": 1, "result": {"loss": "\\ud83d"}}'),
        ("complete", b'{"epoch": 1, "result": {"\\ud800": 1.0}}'),
        ("logs", '{"epoch": 1, "lines": ["\ud800"]}'.encode("utf-16-le", "surrogatepass")),
    ],
)
def test_a_lone_surrogate_is_a_400_not_a_500(
    api: Api, running: tuple[Worker, str], route: str, raw: bytes
) -> None:
    worker, job_id = running
    body = assert_error(post(api, worker, f"/v1/jobs/{job_id}/{route}", raw), 400, "bad_request")
    assert "surrogate" in body["message"]
    assert api.job(job_id)["job"]["state"] == "running"
    assert api.coord.queue.logs(job_id) == []


def test_a_surrogate_pair_and_a_nul_are_kept_verbatim(
    api: Api, running: tuple[Worker, str]
) -> None:
    worker, job_id = running
    raw = b'{"epoch": 1, "lines": ["emoji \\ud83d\\ude00", "nul \\u0000 byte"]}'
    assert post(api, worker, f"/v1/jobs/{job_id}/logs", raw).status_code == 200
    lines = api.http.get(f"/v1/jobs/{job_id}/logs", headers=OP).json()["lines"]
    assert [line["line"] for line in lines] == ["emoji \U0001f600", "nul \x00 byte"]


# results --------------------------------------------------------------------------------------


def test_a_result_over_the_limit_is_a_413_and_the_attempt_stays_open(
    api: Api, running: tuple[Worker, str]
) -> None:
    worker, job_id = running
    assert WORKER_LIMITS["max_result_bytes"] == MAX_RESULT_BYTES
    result = {f"k{i}": "\x1b[2J[bold red]x[/]" for i in range(100_000)}  # ~3 MB, 100k keys
    raw = json.dumps({"epoch": 1, "result": result}).encode()
    r = post(api, worker, f"/v1/jobs/{job_id}/complete", raw)
    assert_error(r, 413, "payload_too_large")
    assert api.job(job_id)["job"]["state"] == "running"
    small = json.dumps({"epoch": 1, "result": {"metrics": {"loss": 1.0}}}).encode()
    assert post(api, worker, f"/v1/jobs/{job_id}/complete", small).status_code == 200


# artifact names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a/b", "a\\b", "\x1b[2Jx", "\x9b31mred", "evil\u202etxt.exe", "x" * 201, ""]
)
def test_an_artifact_name_with_separators_or_escapes_is_refused(
    api: Api, running: tuple[Worker, str], name: str
) -> None:
    worker, job_id = running
    assert_error(api.upload(worker, job_id, 1, b"bytes", name=name), 400, "bad_request")
    assert api.coord.queue.artifacts(job_id) == []


def test_a_printable_unicode_artifact_name_is_kept(api: Api, running: tuple[Worker, str]) -> None:
    worker, job_id = running
    r = api.upload(worker, job_id, 1, b"bytes", name="modèle 漢字.tar.zst")
    assert r.status_code == 200, r.text
    assert api.coord.queue.artifacts(job_id)[0].name == "modèle 漢字.tar.zst"


# uploads racing each other and the collector ---------------------------------------------------


def test_a_fenced_upload_never_deletes_bytes_another_attempt_is_binding(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B (job alpha) stores the bytes first, A (job beta) commits the same digest (already
    there), then B is fenced at its bind: B must not delete what A is about to bind."""
    api.reload(SWEEP)
    wb, wa = api.register("cpu-a"), api.register("cpu-b")
    job_b, job_a = api.claim(wb)["job"]["id"], api.claim(wa)["job"]["id"]
    data = b"identical outputs of two attempts"
    sha = hashlib.sha256(data).hexdigest()
    queue = api.coord.queue
    bind = queue.record_artifact
    b_at_bind, a_at_bind, b_finished = threading.Event(), threading.Event(), threading.Event()

    def record_artifact(job_id: str, *args: Any) -> Any:
        if job_id == job_b:
            b_at_bind.set()
            assert a_at_bind.wait(10)  # A has committed (found the blob stored)
            queue.requeue(job_b)  # B's claim is written off just before it binds
        else:
            a_at_bind.set()
            assert b_finished.wait(10)  # B's refusal (and any cleanup) is over
        return bind(job_id, *args)

    monkeypatch.setattr(queue, "record_artifact", record_artifact)
    replies: dict[str, httpx.Response] = {}

    def upload(key: str, worker: Worker, job_id: str) -> None:
        params = {"epoch": 1, "size": len(data)}
        path = upload_path(job_id, sha)
        replies[key] = asgi(api, "PUT", path, content=data, params=params, headers=worker.auth)

    b = threading.Thread(target=upload, args=("b", wb, job_b))
    b.start()
    assert b_at_bind.wait(10)
    a = threading.Thread(target=upload, args=("a", wa, job_a))
    a.start()
    b.join(10)
    b_finished.set()
    a.join(10)
    assert_error(replies["b"], 409, "stale_epoch")
    assert replies["a"].status_code == 200, replies["a"].text
    assert [r.sha256 for r in queue.artifacts(job_a)] == [sha]
    assert api.coord.store.exists(sha)
    assert api.http.get(f"/v1/artifacts/{sha}", headers=OP).content == data


def test_the_collector_spares_a_blob_recommitted_after_its_listing(api: Api) -> None:
    """GC lists an old unbound blob; an upload commits the same bytes again (restarting its
    grace period) before GC decides: the blob stays."""
    store, queue = api.coord.store, api.coord.queue
    data = b"an old orphan uploaded again"
    sha = hashlib.sha256(data).hexdigest()

    def commit() -> None:
        with IngestBuffer(api.tmp_path / "stage") as buf:
            buf.write(data)
            store.commit_ingested(buf, sha, len(data))

    commit()
    listed = time.time() - 7200
    real_stored = store.stored

    def stored_then_recommitted() -> Iterator[tuple[str, float]]:
        assert [s for s, _ in real_stored()] == [sha]
        commit()  # the upload lands between the listing and the decision
        yield sha, listed

    store.stored = stored_then_recommitted  # type: ignore[method-assign]
    assert collect_garbage(store, queue, grace_s=3600) == []
    assert store.exists(sha)


def test_the_collector_spares_a_pinned_blob(api: Api) -> None:
    store, queue = api.coord.store, api.coord.queue
    data = b"committed, not bound yet"
    sha = hashlib.sha256(data).hexdigest()
    with store.pinned(sha):
        with IngestBuffer(api.tmp_path / "stage") as buf:
            buf.write(data)
            store.commit_ingested(buf, sha, len(data))
        assert collect_garbage(store, queue, grace_s=-1) == []  # "old", unbound, but pinned
        assert store.exists(sha)
    assert collect_garbage(store, queue, grace_s=-1) == [sha]


# log floods -----------------------------------------------------------------------------------


def send_lines(api: Api, worker: Worker, job_id: str, epoch: int, lines: list[str]) -> int:
    r = api.http.post(
        f"/v1/jobs/{job_id}/logs", json={"epoch": epoch, "lines": lines}, headers=worker.auth
    )
    assert r.status_code == 200, r.text
    count: int = r.json()["count"]
    return count


def test_a_log_flood_stops_at_the_attempts_line_quota_and_flags_the_job(
    api: Api, running: tuple[Worker, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_quota, "MAX_LOG_LINES_PER_ATTEMPT", 25)
    worker, job_id = running
    assert send_lines(api, worker, job_id, 1, [f"line {i}" for i in range(20)]) == 20
    assert send_lines(api, worker, job_id, 1, [f"more {i}" for i in range(20)]) == 5
    for _ in range(3):  # the flood goes on: answered, nothing stored, flagged once
        assert send_lines(api, worker, job_id, 1, ["flood"] * 1000) == 0
    assert len(api.coord.queue.logs(job_id, limit=10_000)) == 25
    detail = api.job(job_id)
    flags = detail["job"]["flags"]
    assert len(flags) == 1 and "log truncated at 25 lines" in flags[0], flags
    assert [e["kind"] for e in detail["events"]].count("log_truncated") == 1
    assert api.job(job_id)["job"]["state"] == "running"  # the attempt itself goes on


def test_the_log_quota_counts_characters_and_is_per_attempt(
    api: Api, running: tuple[Worker, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_quota, "MAX_LOG_CHARS_PER_ATTEMPT", 10_000)
    worker, job_id = running
    long_line = "x" * 100_000  # cut to MAX_LOG_LINE_CHARS before it is counted
    assert send_lines(api, worker, job_id, 1, [long_line, long_line, long_line]) == 2
    assert sum(len(line.line) for line in api.coord.queue.logs(job_id)) == 2 * MAX_LOG_LINE_CHARS
    api.coord.queue.requeue(job_id)  # attempt 2 starts with a fresh quota
    claim = api.claim(worker)
    assert claim["attempt"] == 2
    assert send_lines(api, worker, job_id, claim["epoch"], ["fresh"]) == 1


# artifact floods ------------------------------------------------------------------------------


def test_an_attempt_keeps_at_most_a_few_distinct_artifacts(
    api: Api, running: tuple[Worker, str]
) -> None:
    worker, job_id = running
    for i in range(MAX_ARTIFACTS_PER_ATTEMPT):
        assert api.upload(worker, job_id, 1, f"archive {i}".encode()).status_code == 200
    assert api.upload(worker, job_id, 1, b"archive 0").status_code == 200  # a retry: idempotent
    body = assert_error(api.upload(worker, job_id, 1, b"one too many"), 409, "conflict")
    assert "at most" in body["message"]
    assert not api.coord.store.exists(hashlib.sha256(b"one too many").hexdigest())
    assert len(api.coord.queue.artifacts(job_id)) == MAX_ARTIFACTS_PER_ATTEMPT


def test_an_attempts_artifacts_share_one_uploads_byte_limit(
    tmp_path: Path, clock: FakeClock
) -> None:
    with serve(tmp_path, clock, max_upload_bytes=100) as api:
        worker, job_id = api.claimed()
        assert api.upload(worker, job_id, 1, b"a" * 60).status_code == 200
        assert_error(api.upload(worker, job_id, 1, b"b" * 60), 413, "payload_too_large")
        assert api.upload(worker, job_id, 1, b"c" * 40).status_code == 200


@pytest.mark.parametrize("metrics", ['"a string"', "[1, 2]", "3"])
def test_result_metrics_must_be_an_object(
    api: Api, running: tuple[Worker, str], metrics: str
) -> None:
    """``trainfleet list`` reads ``result.metrics`` as an object of named values."""
    worker, job_id = running
    raw = f'{{"epoch": 1, "result": {{"metrics": {metrics}}}}}'.encode()
    body = assert_error(post(api, worker, f"/v1/jobs/{job_id}/complete", raw), 400, "bad_request")
    assert "metrics" in body["message"]
    assert api.job(job_id)["job"]["state"] == "running"


def test_an_integer_too_long_to_parse_is_a_400(api: Api, running: tuple[Worker, str]) -> None:
    worker, job_id = running
    raw = b'{"epoch": 1, "result": {"metrics": {"loss": ' + b"9" * 5000 + b"}}}"
    body = assert_error(post(api, worker, f"/v1/jobs/{job_id}/complete", raw), 400, "bad_request")
    assert "not valid JSON" in body["message"]


def fake_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(space.shutil, "disk_usage", lambda _: usage._replace(free=free))


def test_an_upload_that_would_eat_the_databases_margin_is_a_507_unread(
    api: Api, running: tuple[Worker, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, job_id = running
    fake_free(monkeypatch, space.KEEP_FREE_BYTES + 5000)
    body = Pulled(10, b"x" * 1000)
    r = asgi(api, "PUT", upload_path(job_id, "a" * 64), content=body,
             params={"epoch": 1, "size": 10_000}, headers=worker.auth)  # fmt: skip
    assert "retry later" in assert_error(r, 507, "insufficient_storage")["message"]
    assert body.pulled == 0
    assert list(api.coord.staging_dir.iterdir()) == []
    assert api.upload(worker, job_id, 1, b"x" * 4000).status_code == 200  # this one fits


def test_uploads_in_flight_reserve_their_declared_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_free(monkeypatch, space.KEEP_FREE_BYTES + 1000)
    with space.reserve(tmp_path, 600):
        with pytest.raises(InsufficientStorage), space.reserve(tmp_path, 600):
            pass
        with space.reserve(tmp_path, 400):
            pass
    with space.reserve(tmp_path, 1000):
        pass
