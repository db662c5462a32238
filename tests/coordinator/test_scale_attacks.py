"""An attacker's view of issue 9's new surfaces: long-poll claims, the heartbeat book, the
batch endpoints, the credential cache and ``trainfleet db``.

What must never happen: a 500 (or a traceback) for anything a worker can send; a worker
holding more than a few long polls at once; a beat, completion or claim that fencing should
refuse being accepted (another worker's job, a stale epoch, a cancelled job, a revoked or
deregistered credential); a beat that reached the coordinator being ignored by a reaper; a
database password printed. In-process, on the fake clock; every wait has a timeout.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_api import ONE_JOB, OP, SWEEP, Api, Worker, assert_error, serve
from test_batch_api import register
from typer.testing import CliRunner

from fleetkit import FakeClock
from trainfleet.cli.main import app as cli
from trainfleet.coordinator.app import db_runner
from trainfleet.coordinator.longpoll import MAX_WAITING_PER_WORKER
from trainfleet.errors import Unauthorized
from trainfleet.queue.beats import Beat
from trainfleet.testing.wait import wait_until

JSON = {"content-type": "application/json"}
TWO = SWEEP  # jobs 'alpha' (priority 10) and 'beta'


@pytest.fixture
def quiet(tmp_path: Path, clock: FakeClock) -> Iterator[Api]:
    """The app with its flusher and reaper idle (an hour apart): the test flushes by hand,
    so what the book holds unflushed is the test's to decide."""
    with serve(tmp_path, clock, beat_flush_s=3600, reap_interval_s=3600) as a:
        yield a


def flush(api: Api) -> None:
    """Flush the heartbeat book on the app's own event loop."""
    api.http.portal.call(api.coord.beats.flush, db_runner(api.coord))  # type: ignore[union-attr]


def post(api: Api, path: str, worker: Worker, raw: bytes) -> httpx.Response:
    return api.http.post(path, content=raw, headers={**worker.auth, **JSON})


def beat(api: Api, worker: Worker, job_id: str, epoch: int) -> httpx.Response:
    return api.http.post(f"/v1/jobs/{job_id}/heartbeat", json={"epoch": epoch}, headers=worker.auth)


def running_job(api: Api, text: str = ONE_JOB) -> tuple[Worker, str]:
    """A worker holding epoch 1 of the first job of ``text``, running (its first beat)."""
    api.reload(text)
    worker = api.register()
    job_id = api.claim(worker)["job"]["id"]
    assert beat(api, worker, job_id, 1).json()["state"] == "running"
    return worker, job_id


# malformed bodies: a 4xx with a JSON body, never a 500 ---------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"wait_s": NaN}',
        b'{"wait_s": Infinity}',
        b'{"wait_s": -Infinity}',
        b'{"wait_s": 1e999}',
        b'{"wait_s": -1e-9}',
        b'{"wait_s": 30.000001}',
        b'{"wait_s": 123456789012345678901234567890}',
        b'{"wait_s": "5s"}',
        b'{"wait_s": null}',
        b'{"wait_s": [1]}',
        b'{"wait_s": {"s": 1}}',
        b'{"wait_s": 1, "max_jobs": 2}',
        b"[]",
        b"null",
        b'"wait"',
        b"[" * 100 + b"]" * 100,
        b'{"wait_s": ' + b"[" * 5000,
        b"\xff\xfe",
    ],
)
def test_a_malformed_long_poll_body_is_a_400(api: Api, raw: bytes) -> None:
    api.reload(ONE_JOB)
    worker = api.register()
    assert_error(post(api, "/v1/workers/claim", worker, raw), 400, "bad_request")
    assert api.job("solo")["job"]["state"] == "pending"  # nothing was claimed


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/claims", {"max_jobs": 0}),
        ("/v1/claims", {"max_jobs": -1}),
        ("/v1/claims", {"max_jobs": 2**70}),
        ("/v1/claims", {"max_jobs": 1.5}),
        ("/v1/claims", {"max_jobs": 1, "wait_s": -0.1}),
        ("/v1/heartbeats", {"beats": {"job_id": "x", "epoch": 1}}),
        ("/v1/heartbeats", {"beats": [1]}),
        ("/v1/heartbeats", {"beats": [{"job_id": "x"}]}),
        ("/v1/heartbeats", {"beats": [{"job_id": "", "epoch": 1}]}),
        ("/v1/heartbeats", {"beats": [{"job_id": "x" * 257, "epoch": 1}]}),
        ("/v1/heartbeats", {"beats": [{"job_id": "x", "epoch": 0}]}),
        ("/v1/heartbeats", {"beats": [{"job_id": ["x"], "epoch": 1}]}),
        ("/v1/heartbeats", {}),
        ("/v1/completions", {"results": [{"job_id": "x", "epoch": 1, "result": []}]}),
        ("/v1/completions", {"results": [{"job_id": "x", "epoch": -5, "result": {}}]}),
        ("/v1/completions", {"results": "all of them"}),
    ],
)
def test_a_malformed_batch_is_a_4xx(api: Api, path: str, body: dict[str, Any]) -> None:
    worker = register(api, slots=4)
    r = api.http.post(path, json=body, headers=worker.auth)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"] and "Traceback" not in r.text


@pytest.mark.parametrize("path, key", [("/v1/heartbeats", "beats"), ("/v1/completions", "results")])
def test_a_batch_of_twenty_thousand_items_is_refused(api: Api, path: str, key: str) -> None:
    worker = register(api, slots=4)
    item: dict[str, Any] = {"job_id": "0123abcd", "epoch": 1}
    if key == "results":
        item["result"] = {}
    r = api.http.post(path, json={key: [item] * 20_000}, headers=worker.auth)
    assert r.status_code in (400, 413, 422), r.text
    assert "64" in r.json()["message"]


@pytest.mark.parametrize("path, key", [("/v1/heartbeats", "beats"), ("/v1/completions", "results")])
def test_a_huge_batch_is_refused_before_its_items_are_validated(
    api: Api, path: str, key: str
) -> None:
    worker = register(api, slots=4)
    items: list[dict[str, Any]] = [{"job_id": "0123abcd", "epoch": 1, "result": {}}] * 20_000
    items[15_000] = {"job_id": "0123abcd", "epoch": 0, "result": {}}  # item 15,000 is bad too
    if key == "beats":
        items = [{k: v for k, v in item.items() if k != "result"} for item in items]
    r = api.http.post(path, json={key: items}, headers=worker.auth)
    assert 400 <= r.status_code < 500, r.text
    assert "15000" not in r.text  # refused for its length, not after reading every item


def test_epochs_past_sqlite_integers_are_refused_or_fenced_never_a_500(api: Api) -> None:
    api.reload(ONE_JOB)
    worker = register(api, slots=2)
    api.http.post("/v1/claims", json={"max_jobs": 1}, headers=worker.auth)
    job_id = api.job("solo")["job"]["id"]
    for epoch in (2**63, 2**64, 10**40):
        beats = {"beats": [{"job_id": job_id, "epoch": epoch}]}
        r = api.http.post("/v1/heartbeats", json=beats, headers=worker.auth)
        assert r.status_code == 400 or r.json()["replies"][0]["outcome"] == "fenced", r.text
        results = {"results": [{"job_id": job_id, "epoch": epoch, "result": {}}]}
        r = api.http.post("/v1/completions", json=results, headers=worker.auth)
        assert r.status_code == 400 or r.json()["outcomes"][0]["outcome"] == "fenced", r.text
    assert api.job(job_id)["job"]["state"] == "claimed"


# fencing in the batch endpoints ---------------------------------------------------------------


def test_a_batch_completion_of_another_workers_job_is_fenced(api: Api) -> None:
    owner, job_id = running_job(api)
    thief = register(api, host="cpu-b", slots=4)
    for ref in (job_id, "solo", job_id[:8]):  # by id, by name, by prefix
        results = {"results": [{"job_id": ref, "epoch": 1, "result": {"metrics": {}}}]}
        r = api.http.post("/v1/completions", json=results, headers=thief.auth)
        assert r.status_code == 200, r.text
        assert r.json()["outcomes"][0]["outcome"] == "fenced"
        beats = {"beats": [{"job_id": job_id, "epoch": 1}]}
        reply = api.http.post("/v1/heartbeats", json=beats, headers=thief.auth).json()
        assert reply["replies"][0]["outcome"] == "fenced"  # the book knows it: still not his
    job = api.job(job_id)["job"]  # running once the book's first beat is flushed
    assert (job["state"] in ("claimed", "running"), job["worker_id"]) == (True, owner.id)


def test_duplicate_items_in_a_batch_complete_a_job_once(api: Api) -> None:
    worker = register(api, slots=2)
    api.reload(ONE_JOB)
    claim = api.http.post("/v1/claims", json={"max_jobs": 1}, headers=worker.auth).json()
    job_id = claim["claims"][0]["job"]["id"]
    beats = {"beats": [{"job_id": job_id, "epoch": 1}] * 3}
    replies = api.http.post("/v1/heartbeats", json=beats, headers=worker.auth).json()["replies"]
    assert [r["outcome"] for r in replies] == ["ok", "ok", "ok"]
    first, other = {"metrics": {"loss": 1.0}}, {"metrics": {"loss": 0.0}}
    items = [{"job_id": job_id, "epoch": 1, "result": res} for res in (first, other, first)]
    r = api.http.post("/v1/completions", json={"results": items}, headers=worker.auth)
    assert r.status_code == 200, r.text
    outcomes = [o["outcome"] for o in r.json()["outcomes"]]
    assert outcomes == ["accepted", "refused", "accepted"]  # the last: the same report again
    job = api.job(job_id)
    assert job["job"]["result"] == first
    assert [e["kind"] for e in job["events"]].count("completed") == 1


def test_a_replayed_or_cancelled_completion_changes_nothing(api: Api) -> None:
    worker = register(api, slots=2)
    api.reload(TWO)
    got = api.http.post("/v1/claims", json={"max_jobs": 2}, headers=worker.auth).json()["claims"]
    alpha, beta = (c["job"]["id"] for c in got)
    assert api.http.post(f"/v1/jobs/{beta}/cancel", headers=OP).is_success
    assert api.http.post(f"/v1/jobs/{alpha}/requeue", headers=OP).is_success
    again = api.http.post("/v1/claims", json={"max_jobs": 2}, headers=worker.auth).json()
    assert [c["job"]["id"] for c in again["claims"]] == [alpha]
    new_epoch = again["claims"][0]["epoch"]
    assert new_epoch > 1
    items = [
        {"job_id": alpha, "epoch": 1, "result": {}},  # the written-off attempt, replayed
        {"job_id": beta, "epoch": 1, "result": {}},  # cancelled meanwhile
    ]
    r = api.http.post("/v1/completions", json={"results": items}, headers=worker.auth)
    assert [o["outcome"] for o in r.json()["outcomes"]] == ["fenced", "refused"]
    job = api.job(alpha)["job"]
    assert (job["state"], job["epoch"]) == ("claimed", new_epoch)
    assert api.job(beta)["job"]["state"] == "cancelled"


SQL_BAIT = ["x'; DROP TABLE jobs; --", "a%sb?", "%(epoch)s", "?", "' OR '1'='1", "\\"]


def test_sql_in_batch_items_is_only_ever_data(api: Api) -> None:
    worker, job_id = running_job(api)
    beats = {"beats": [{"job_id": bait, "epoch": 1} for bait in SQL_BAIT]}
    r = api.http.post("/v1/heartbeats", json=beats, headers=worker.auth)
    assert {o["outcome"] for o in r.json()["replies"]} == {"refused"}, r.text
    results = {"results": [{"job_id": bait, "epoch": 1, "result": {}} for bait in SQL_BAIT]}
    r = api.http.post("/v1/completions", json=results, headers=worker.auth)
    assert {o["outcome"] for o in r.json()["outcomes"]} == {"refused"}, r.text
    assert api.job(job_id)["job"]["state"] in ("claimed", "running")


def test_sql_in_references_is_only_ever_data_on_postgres() -> None:
    """The PostgreSQL connection rewrites ``?`` placeholders and doubles ``%``: in the SQL
    text only, never in a parameter."""
    from trainfleet.errors import NotFound
    from trainfleet.queue.sqlite import PostgresQueue
    from trainfleet.testing.postgres import fresh_schema, require_server

    require_server()
    with fresh_schema() as url:
        queue = PostgresQueue(url)
        try:
            for bait in SQL_BAIT:
                with pytest.raises(NotFound):
                    queue.get_job(bait)
                with pytest.raises(NotFound):
                    queue.heartbeat(bait, bait, 1)
            assert queue.counts() == {}
        finally:
            queue.close()


# the heartbeat book ---------------------------------------------------------------------------


def test_the_book_never_answers_a_written_off_attempt_with_200(quiet: Api) -> None:
    api = quiet
    worker, job_id = running_job(api)
    assert beat(api, worker, job_id, 1).status_code == 200  # from memory now
    assert api.http.post(f"/v1/jobs/{job_id}/requeue", headers=OP).is_success
    other = api.register("cpu-b")
    epoch = api.claim(other)["epoch"]
    assert epoch > 1
    assert_error(beat(api, worker, job_id, 1), 409, "stale_epoch")
    assert_error(beat(api, other, job_id, 1), 409, "stale_epoch")  # the right worker, old epoch
    assert beat(api, other, job_id, epoch).json()["state"] == "running"
    assert_error(beat(api, worker, job_id, epoch), 409, "stale_epoch")  # right epoch, not his
    flush(api)
    job = api.job(job_id)["job"]
    assert (job["worker_id"], job["epoch"], job["state"]) == (other.id, epoch, "running")


def test_a_beat_after_cancel_or_completion_is_not_running(quiet: Api) -> None:
    api = quiet
    worker, job_id = running_job(api, TWO)
    assert beat(api, worker, job_id, 1).status_code == 200  # in the book
    assert api.http.post(f"/v1/jobs/{job_id}/cancel", headers=OP).is_success
    reply = beat(api, worker, job_id, 1).json()
    assert (reply["cancel"], reply["state"]) == (True, "cancelled")
    assert api.http.post(
        f"/v1/jobs/{job_id}/fail", json={"epoch": 1, "error": "stopped"}, headers=worker.auth
    ).status_code in (200, 409)
    beta = api.claim(worker)["job"]["id"]
    assert beat(api, worker, beta, 1).status_code == 200
    done = {"epoch": 1, "result": {"metrics": {}}}
    assert api.http.post(f"/v1/jobs/{beta}/complete", json=done, headers=worker.auth).is_success
    assert_error(beat(api, worker, beta, 1), 409, "conflict")


def test_a_claim_never_reaps_an_attempt_whose_beats_are_in_the_book(
    quiet: Api, clock: FakeClock
) -> None:
    """Leases are 10 s here. The worker beat 6 s ago (answered from memory, not yet flushed);
    its last beat in the database is 12 s old. Another worker's claim must not take its job:
    only the reaper reaps, and it flushes the book first."""
    api = quiet
    worker, job_id = running_job(api)
    clock.advance(6)
    assert beat(api, worker, job_id, 1).status_code == 200  # in memory only
    clock.advance(6)
    other = api.register("cpu-b")
    r = api.http.post("/v1/workers/claim", headers=other.auth)
    assert r.status_code == 200 and r.json()["claim"] is None, r.text
    assert beat(api, worker, job_id, 1).json()["state"] == "running"
    flush(api)
    job = api.job(job_id)["job"]
    assert (job["state"], job["epoch"], job["worker_id"]) == ("running", 1, worker.id)


def test_a_flushed_beat_does_not_bring_back_a_deregistered_credential(
    quiet: Api, clock: FakeClock
) -> None:
    """The worker deregistered through another coordinator of the database; this one's cache
    still names its credential (for up to a second) and takes a beat into the book."""
    api = quiet
    worker, job_id = running_job(api)
    api.coord.queue.deregister_worker(worker.id)  # elsewhere: this cache is not cleared
    clock.advance(1)
    assert beat(api, worker, job_id, 1).status_code == 200  # pending in the book
    flush(api)
    api.coord.tokens.clear()  # the cache's second has passed
    assert_error(api.http.post("/v1/workers/claim", headers=worker.auth), 401, "unauthorized")
    workers = {w["id"]: w for w in api.http.get("/v1/workers", headers=OP).json()["workers"]}
    assert workers[worker.id]["state"] == "stopped"


def test_a_claim_racing_a_deregistration_takes_nothing(api: Api) -> None:
    """The request was authenticated (or its credential cached by another coordinator) just
    before the worker deregistered: the claim inside the write lock refuses it."""
    api.reload(ONE_JOB)
    worker = api.register()
    queue = api.coord.queue
    queue.deregister_worker(worker.id)
    with pytest.raises(Unauthorized):
        queue.claim(worker.id)
    queue.heartbeat_many([Beat("nothing", worker.id, 1, api.clock())])
    with pytest.raises(Unauthorized):
        queue.authenticate_worker(worker.token)
    assert api.job("solo")["job"]["state"] == "pending"


# credentials and long polls -------------------------------------------------------------------


def test_a_revoke_elsewhere_stops_a_cached_credential_from_claiming(api: Api) -> None:
    """Revoked through the database (another coordinator): this one's cache still names the
    worker for up to a second, but the claim itself refuses it, waiting or not."""
    worker = api.register()
    assert api.http.post("/v1/workers/claim", headers=worker.auth).json() == {"claim": None}
    assert api.coord.tokens.get("worker", worker.token) == worker.id  # cached
    got: list[httpx.Response] = []
    waiting = threading.Thread(
        target=lambda: got.append(
            api.http.post("/v1/workers/claim", json={"wait_s": 30}, headers=worker.auth)
        )
    )
    waiting.start()
    try:
        wait_until(lambda: api.coord.work.waiting == 1, 10, "the claim to wait")
        api.coord.queue.revoke_worker(worker.id)  # not through this coordinator's endpoint
        assert api.coord.tokens.get("worker", worker.token) == worker.id  # still cached
    finally:
        api.reload(ONE_JOB)  # work arrives: the waiting claim tries again
        waiting.join(20)
    assert_error(got[0], 401, "unauthorized")
    assert api.job("solo")["job"]["state"] == "pending"


def test_one_worker_cannot_hold_many_long_polls(api: Api) -> None:
    """Each waiting claim holds a connection and is tried again on every wake-up, on the one
    writer thread: a worker may keep only a few waiting, the rest are answered at once."""
    worker = api.register()
    extra = 6
    got: list[httpx.Response] = []
    lock = threading.Lock()

    def long_poll() -> None:
        r = api.http.post("/v1/workers/claim", json={"wait_s": 30}, headers=worker.auth)
        with lock:
            got.append(r)

    threads = [threading.Thread(target=long_poll) for _ in range(MAX_WAITING_PER_WORKER + extra)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(got) >= extra, 10, "the claims over the bound to be answered")
        assert api.coord.work.waiting <= MAX_WAITING_PER_WORKER
        assert all(r.status_code == 200 and r.json() == {"claim": None} for r in got)
    finally:
        api.reload(ONE_JOB)
        for t in threads:
            t.join(20)
    claimed = {json.dumps(r.json()["claim"], sort_keys=True) for r in got if r.json()["claim"]}
    assert len(claimed) <= 1  # the same one claim, redelivered, never two jobs
    assert api.coord.work.waiting == 0


# trainfleet db --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"this is not a database\n" * 100, b"SQLite format 3\x00" + b"\xff" * 4000, b""],
)
def test_db_upgrade_on_a_garbage_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(content)
    for args in (["db", "upgrade", "--db", str(path)], ["db", "status", "--db", str(path)]):
        result = CliRunner().invoke(cli, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        if content:
            assert result.exit_code != 0
            assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "tables",
    [
        [
            "CREATE TABLE schema_migrations (version TEXT, note BLOB)",
            "INSERT INTO schema_migrations VALUES ('v-two', x'00')",
        ],
        [
            "CREATE TABLE schema_migrations (version INTEGER)",
            "INSERT INTO schema_migrations VALUES (1)",
        ],
        ["CREATE TABLE jobs (id INTEGER)"],  # another program's jobs: taken for issue 8's
    ],
)
def test_db_upgrade_on_a_foreign_sqlite_schema_is_a_clear_error(
    tmp_path: Path, tables: list[str]
) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as raw:
        for statement in tables:
            raw.execute(statement)
    raw.close()
    for args in (["db", "upgrade"], ["db", "status"], ["db", "upgrade", "--dry-run"]):
        result = CliRunner().invoke(cli, [*args, "--db", str(path)])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output
    assert result.exit_code != 0 or "up to date" not in result.output


@pytest.mark.parametrize(
    "url",
    [
        "mysql://admin:hunter2secret@db.example/fleet",
        "postgresql://admin:hunter2secret@[::1/fleet",
        "postgresql://admin@127.0.0.1:1/fleet?password=hunter2secret&connect_timeout=1",
    ],
)
def test_a_database_password_is_never_printed(url: str) -> None:
    result = CliRunner().invoke(cli, ["db", "status", "--db", url])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "hunter2secret" not in result.output
