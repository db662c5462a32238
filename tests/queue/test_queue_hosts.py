"""The queue's host enrollment and revocation contract (run against every backend): tokens
stored hashed, a token bound to its host, revocation that takes effect inside the write lock,
and open-mode hosts that no policy reaches."""

from __future__ import annotations

import sqlite3

import pytest

from fleetkit import make_cap, manifest_of
from trainfleet.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from trainfleet.queue import JobQueue
from trainfleet.queue.sqlite import SQLiteQueue

ONE_JOB = '[[jobs]]\nname = "solo"\nhyper = { steps = 5 }\n'


def test_only_the_hash_of_a_join_token_is_stored(queue: JobQueue) -> None:
    token = queue.enroll_host("cpu-a")
    assert isinstance(queue, SQLiteQueue)
    conn = sqlite3.connect(queue.path)
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert token not in dump
    assert queue.authenticate_host(token) == "cpu-a"


def test_enrollment_names_follow_the_host_policy(queue: JobQueue) -> None:
    for bad in ("", "-a", "a b", "a" * 64, "open:a", "gpu\x1b"):
        with pytest.raises(BadRequest):
            queue.enroll_host(bad)
    queue.enroll_host("a" * 63)
    with pytest.raises(Conflict):
        queue.enroll_host("a" * 63)


def test_a_token_registers_its_own_host_only(queue: JobQueue) -> None:
    token = queue.enroll_host("gpu-box")
    worker, _ = queue.register_enrolled(make_cap("laptop"), token)  # no explicit --host
    assert worker.host == "gpu-box" and worker.capability.host == "gpu-box"
    odd = make_cap("My-Laptop").model_copy(update={"hostname": "My Laptop"})  # detected
    assert queue.register_enrolled(odd, token)[0].host == "gpu-box"
    explicit = make_cap("cpu-b").model_copy(update={"hostname": "laptop"})
    with pytest.raises(Forbidden, match="this token is enrolled for host gpu-box"):
        queue.register_enrolled(explicit, token)
    with pytest.raises(Unauthorized):
        queue.register_enrolled(make_cap("gpu-box"), "not-a-token")


def test_a_revoke_wins_over_a_request_already_authenticated(queue: JobQueue) -> None:
    """A claim whose credential was checked just before the revoke committed gets nothing."""
    queue.apply_manifest(manifest_of(ONE_JOB))
    worker, token = queue.register_enrolled(make_cap("cpu-a"), queue.enroll_host("cpu-a"))
    assert queue.authenticate_worker(token) == worker.id
    queue.revoke_worker(worker.id)
    with pytest.raises(Unauthorized, match="revoked"):
        queue.claim(worker.id)
    with pytest.raises(Unauthorized, match="revoked"):
        queue.authenticate_worker(token)
    assert queue.counts() == {"pending": 1}
    assert [w.state for w in queue.list_workers()] == ["revoked"]


def test_revoking_requeues_without_charging_the_job(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(ONE_JOB))
    token = queue.enroll_host("cpu-a")
    worker, _ = queue.register_enrolled(make_cap("cpu-a"), token)
    claim = queue.claim(worker.id)
    assert claim is not None
    requeued = queue.revoke_host("cpu-a")
    assert [j.name for j in requeued] == ["solo"]
    job = queue.get_job("solo")
    assert job.state == "pending" and job.num_failures == 0 and job.epoch == claim.epoch + 1
    assert queue.events(job.id)[-1].kind == "revoked"
    with pytest.raises(Unauthorized, match="revoked"):
        queue.authenticate_host(token)
    with pytest.raises(NotFound):
        queue.revoke_host("nobody")
    with pytest.raises(NotFound):
        queue.revoke_worker("nobody")


def test_rotation_invalidates_the_old_token_only(queue: JobQueue) -> None:
    old = queue.enroll_host("cpu-a")
    worker, credential = queue.register_enrolled(make_cap("cpu-a"), old)
    new = queue.rotate_host("cpu-a")
    with pytest.raises(Unauthorized):
        queue.authenticate_host(old)
    assert queue.authenticate_host(new) == "cpu-a"
    assert queue.authenticate_worker(credential) == worker.id  # running workers keep going
    queue.rotate_host("cpu-a", revoke_workers=True)
    with pytest.raises(Unauthorized):
        queue.authenticate_worker(credential)
    hosts = queue.list_hosts()
    assert [(h.name, h.state, h.workers_online) for h in hosts] == [("cpu-a", "active", 0)]


def test_an_open_host_never_gets_a_policy_or_an_enrolled_name(queue: JobQueue) -> None:
    queue.apply_manifest(
        manifest_of(
            '[hosts.gpu-box]\ncores = 1\n[[jobs]]\nname = "p"\nallowed_hosts = ["gpu-box"]\n'
        )
    )
    worker, _ = queue.register_open(make_cap("gpu-box"))
    assert worker.host == "open:gpu-box" and worker.notes == []
    assert worker.effective.cores == 4
    assert queue.claim(worker.id) is None
    again, _ = queue.register_open(make_cap("open:gpu-box"))
    assert again.host == "open:gpu-box"  # not open:open:...
