"""The queue's host enrollment and revocation contract (run against every backend): tokens
stored hashed, a token bound to its host, revocation that takes effect inside the write lock,
and open-mode hosts that no policy reaches."""

from __future__ import annotations

import pytest

from fleetkit import FakeClock, make_cap, manifest_of
from trainfleet.cli import fleet as fleet_cli
from trainfleet.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    StaleEpoch,
    Unauthorized,
)
from trainfleet.queue import JobQueue, sqlite_workers
from trainfleet.queue.db import Dialect
from trainfleet.queue.sqlite import SQLQueue
from trainfleet.queue.sqlite_schema import token_hash

ONE_JOB = '[[jobs]]\nname = "solo"\nhyper = { steps = 5 }\n'


def dump(queue: JobQueue) -> str:
    """Every row of every table, as text."""
    assert isinstance(queue, SQLQueue)
    with queue.db.read() as conn:
        if conn.dialect == Dialect.SQLITE:
            sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
        else:
            sql = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        tables = [r[0] for r in conn.execute(sql).fetchall()]
        return "\n".join(
            f"{t} {tuple(row)}" for t in tables for row in conn.execute(f"SELECT * FROM {t}")
        )


def test_only_the_hash_of_a_join_token_is_stored(queue: JobQueue) -> None:
    token = queue.enroll_host("cpu-a")
    everything = dump(queue)
    assert "enrollments" in everything and token_hash(token) in everything
    assert token not in everything
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
    new, requeued = queue.rotate_host("cpu-a")
    assert requeued == []
    with pytest.raises(Unauthorized):
        queue.authenticate_host(old)
    assert queue.authenticate_host(new) == "cpu-a"
    assert queue.authenticate_worker(credential) == worker.id  # running workers keep going
    queue.rotate_host("cpu-a", revoke_workers=True)
    with pytest.raises(Unauthorized):
        queue.authenticate_worker(credential)
    hosts = queue.list_hosts()
    assert [(h.name, h.state, h.workers_online) for h in hosts] == [("cpu-a", "active", 0)]


def test_rotating_with_revoke_workers_returns_the_jobs_it_requeued(queue: JobQueue) -> None:
    """As revoke does: the coordinator counts them in its requeue metric and the CLI lists
    them, so a job put back by ``rotate --revoke-workers`` is never silent."""
    queue.apply_manifest(manifest_of(ONE_JOB))
    worker, _ = queue.register_enrolled(make_cap("cpu-a"), queue.enroll_host("cpu-a"))
    claim = queue.claim(worker.id)
    assert claim is not None
    _, kept = queue.rotate_host("cpu-a")  # the workers keep going: nothing requeued
    assert kept == [] and queue.get_job("solo").state == "claimed"
    token, requeued = queue.rotate_host("cpu-a", revoke_workers=True)
    assert [(j.name, j.state, j.epoch) for j in requeued] == [("solo", "pending", claim.epoch + 1)]
    assert queue.events(claim.job.id)[-1].kind == "revoked"
    assert queue.authenticate_host(token) == "cpu-a"


def test_hosts_count_online_workers_by_the_workers_rule(queue: JobQueue, clock: FakeClock) -> None:
    """A worker unseen for ``offline_after_s`` is offline in ``list_workers``; ``list_hosts``
    agrees rather than counting its stored 'online'."""
    token = queue.enroll_host("cpu-a")
    quiet, _ = queue.register_enrolled(make_cap("cpu-a"), token)
    clock.advance(queue.settings.offline_after_s / 2)
    busy, _ = queue.register_enrolled(make_cap("cpu-a"), token)

    def online() -> tuple[int, int]:
        by_workers = sum(w.state == "online" for w in queue.list_workers() if w.host == "cpu-a")
        return by_workers, queue.list_hosts()[0].workers_online

    assert online() == (2, 2)
    clock.advance(queue.settings.offline_after_s / 2 + 1)  # quiet: unseen for longer
    assert online() == (1, 1)
    assert {w.id: w.state for w in queue.list_workers()} == {quiet.id: "offline", busy.id: "online"}
    clock.advance(queue.settings.offline_after_s)
    assert online() == (0, 0)


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


def test_writes_already_authenticated_are_fenced_off_by_a_revoke(queue: JobQueue) -> None:
    """A revoked worker's upload or completion racing the revoke (its credential was checked
    before the revoke committed) lands nothing: the revoke bumped the epoch."""
    queue.apply_manifest(manifest_of(ONE_JOB))
    worker, _ = queue.register_enrolled(make_cap("cpu-a"), queue.enroll_host("cpu-a"))
    claim = queue.claim(worker.id)
    assert claim is not None
    job_id, epoch = claim.job.id, claim.epoch
    queue.revoke_worker(worker.id)
    writes = [
        lambda: queue.record_artifact(job_id, worker.id, epoch, "a" * 64, 3, "model.tar.zst"),
        lambda: queue.complete(job_id, worker.id, epoch, {"metrics": {"heldout_loss": 1.0}}),
        lambda: queue.heartbeat(job_id, worker.id, epoch),
        lambda: queue.append_log(job_id, worker.id, epoch, ["late"]),
        lambda: queue.fail(job_id, worker.id, epoch, "late", retryable=False),
    ]
    for write in writes:
        with pytest.raises((StaleEpoch, Unauthorized)):  # fenced, or refused by touch()
            write()
    assert queue.artifacts(job_id) == [] and queue.logs(job_id) == []
    assert queue.counts() == {"pending": 1}


def test_host_names_follow_one_policy_on_every_path(queue: JobQueue) -> None:
    """Rotate and revoke check names as enroll does, whole-string: a trailing newline (which a
    pattern's '$' lets through) or a look-alike character is not a host name."""
    queue.enroll_host("cpu-a")
    for bad in ("cpu-a\n", "cpu\u2010a", "\u0441pu-a", "a" * 64, "open:open:x"):
        with pytest.raises(BadRequest, match="invalid host name"):
            queue.rotate_host(bad)
        with pytest.raises(BadRequest, match="invalid host name"):
            queue.revoke_host(bad)
        with pytest.raises(BadRequest):
            queue.enroll_host(bad)
    with pytest.raises(NotFound):
        queue.revoke_host("open:nobody")  # an open host's name is valid; it is just unknown


def test_a_repeated_worker_id_suffix_is_drawn_again(
    queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Open workers all giving one name share a host label, never a worker id."""
    draws = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(sqlite_workers.secrets, "token_hex", lambda n: next(draws))
    first, _ = queue.register_open(make_cap("gpu-box"))
    second, second_token = queue.register_open(make_cap("open:gpu-box"))
    assert (first.id, second.id) == ("open:gpu-box-aaaaaa", "open:gpu-box-bbbbbb")
    assert first.host == second.host == "open:gpu-box"
    assert queue.authenticate_worker(second_token) == second.id


def test_the_cli_accepts_every_worker_id_the_registry_makes(queue: JobQueue) -> None:
    """`workers revoke` checks its reference before putting it in a URL; the id of a worker
    of a 63-character host is 70 characters, longer than any host name, and must pass."""
    host = "a" * 63
    worker, _ = queue.register_enrolled(make_cap(host), queue.enroll_host(host))
    assert len(worker.id) == 70
    fleet_cli._check_ref(worker.id, open_ok=True, worker_ok=True)  # no error
    open_worker, _ = queue.register_open(make_cap("b" * 63))
    fleet_cli._check_ref(open_worker.id, open_ok=True, worker_ok=True)
    with pytest.raises(BadRequest, match="invalid host name"):
        fleet_cli._check_ref("..", open_ok=True, worker_ok=True)
