"""Who may claim a referee job or a private job (issue 10), on both backends: a referee is
an enrolled host other than the producer's and the panel's other hosts; a private job goes
only to a worker whose attestation is valid now. ``explain`` says why such a job waits."""

from __future__ import annotations

import pytest

from fleetkit import FakeClock, make_cap, manifest_of
from marketkit import BASELINE_SCORE, sha, submit, terms
from trainfleet.manifest.spec import JobSpec, Manifest
from trainfleet.queue import JobQueue
from trainfleet.queue.claims import PANEL_LOCK_CLASS
from trainfleet.queue.db import Dialect, PostgresDatabase
from trainfleet.queue.explain import PRIVATE_NEEDS, REFEREE_NEEDS
from trainfleet.queue.sqlite import SQLQueue
from trainfleet.verify.spec import RefereeTask


def worker(queue: JobQueue, host: str) -> str:
    """A worker of enrolled host ``host`` (enrolled on first use)."""
    hosts = {h.name for h in queue.list_hosts()}
    token = queue.enroll_host(host) if host not in hosts else queue.rotate_host(host)[0]
    record, _ = queue.register_enrolled(make_cap(host), token)
    return record.id


@pytest.fixture
def market(queue: JobQueue) -> JobQueue:
    queue.create_competition(terms(), sha("baseline"), BASELINE_SCORE)
    return queue


def referee_of(queue: JobQueue, worker_id: str) -> RefereeTask | None:
    claim = queue.claim(worker_id)
    if claim is None:
        return None
    task = claim.job.spec.task
    assert isinstance(task, RefereeTask)
    return task


def test_the_producer_s_host_never_referees_its_own_model(market: JobQueue) -> None:
    submit(market, "m1", producer="alice")
    assert referee_of(market, worker(market, "alice")) is None
    assert referee_of(market, worker(market, "bob")) is not None  # another host may


def test_an_open_mode_host_never_referees(market: JobQueue) -> None:
    submit(market, "m1", producer="alice")
    record, _ = market.register_open(make_cap("carol"))
    assert record.host == "open:carol"
    assert market.claim(record.id) is None


def test_one_host_is_one_referee_however_many_workers_it_runs(market: JobQueue) -> None:
    submission = submit(market, "m1", producer="alice")
    first = referee_of(market, worker(market, "bob"))
    assert first is not None and first.submission_id == submission.id
    assert referee_of(market, worker(market, "bob")) is None  # bob's second worker
    assert referee_of(market, worker(market, "dave")) is not None
    assert referee_of(market, worker(market, "erin")) is not None
    hosts = sorted(j.host or "" for j in market.panel_jobs(submission.id))
    assert hosts == ["bob", "dave", "erin"]


def test_a_multi_slot_worker_takes_one_job_of_a_panel_per_claim(market: JobQueue) -> None:
    first, second = submit(market, "m1"), submit(market, "m2")
    wid = worker(market, "bob")
    market.set_worker_slots(wid, 4)
    claims = market.claim_many(wid, 4)
    panels = sorted(c.job.spec.panel or "" for c in claims)
    assert panels == sorted([first.id, second.id])  # one of each panel, not four
    again = market.claim_many(wid, 4)  # its unacknowledged claims again, nothing new
    assert sorted(c.job.id for c in again) == sorted(c.job.id for c in claims)


def test_a_failed_referee_attempt_goes_back_to_hosts_outside_the_panel(market: JobQueue) -> None:
    submission = submit(market, "m1", producer="alice")
    bob = worker(market, "bob")
    claim = market.claim(bob)
    assert claim is not None
    market.fail(claim.job.id, bob, claim.epoch, "crashed")
    again = market.claim(bob)  # the same job again: bob still holds no other of the panel
    assert again is not None and again.job.id == claim.job.id
    assert {j.host for j in market.panel_jobs(submission.id)} == {"bob", None}


def test_on_postgres_a_panel_decided_by_another_claim_is_skipped(market: JobQueue) -> None:
    """Claims run side by side on PostgreSQL: the panel's advisory lock, held by another
    claim, makes this one skip the panel's jobs instead of reading its hosts too early."""
    assert isinstance(market, SQLQueue)
    if market.db.dialect != Dialect.POSTGRES:
        pytest.skip("SQLite claims hold the one write lock")
    submission = submit(market, "m1", producer="alice")
    bob = worker(market, "bob")
    assert isinstance(market.db, PostgresDatabase)
    other = market.db.connect()
    try:
        other.execute("BEGIN")
        other.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (PANEL_LOCK_CLASS, submission.id)
        )
        assert market.claim(bob) is None
        other.execute("COMMIT")
    finally:
        other.close()
    assert referee_of(market, bob) is not None


def test_explain_names_the_referee_rules(market: JobQueue) -> None:
    submission = submit(market, "m1", producer="alice")
    worker(market, "alice")
    market.register_open(make_cap("carol"))
    bob = worker(market, "bob")
    assert market.claim(bob) is not None
    waiting = market.panel_jobs(submission.id)[1]
    message = market.explain(waiting.id)["message"]
    assert REFEREE_NEEDS in message and "panel hosts: bob" in message
    assert "host alice produced the model under review" in message
    assert "open mode" in message
    assert "host bob already took a job of this panel" in message


def private_job(queue: JobQueue) -> str:
    job = JobSpec(name="secret", kind="command", command=["true"], tier="private")
    queue.apply_manifest(Manifest(jobs=[job]))
    return queue.list_jobs()[0].id


def attest(queue: JobQueue, worker_id: str, until: float) -> None:
    assert isinstance(queue, SQLQueue)
    with queue.db.tx() as conn:
        conn.execute("UPDATE workers SET attested_until = ? WHERE id = ?", (until, worker_id))


def test_a_private_job_goes_only_to_an_attested_worker(queue: JobQueue, clock: FakeClock) -> None:
    job_id = private_job(queue)
    assert queue.get_job(job_id).spec.tier == "private"
    plain, expired, attested = (worker(queue, h) for h in ("plain", "expired", "attested"))
    attest(queue, expired, clock() - 1)
    attest(queue, attested, clock() + 60)
    assert queue.claim(plain) is None
    assert queue.claim(expired) is None
    explained = queue.explain(job_id)["message"]
    assert PRIVATE_NEEDS in explained
    assert explained.count("private: needs an attested worker") >= 3  # the line, two workers
    claim = queue.claim(attested)
    assert claim is not None and claim.job.id == job_id


def test_an_attestation_that_expires_stops_private_claims(
    queue: JobQueue, clock: FakeClock
) -> None:
    job_id = private_job(queue)
    wid = worker(queue, "attested")
    attest(queue, wid, clock() + 10)
    clock.advance(11)
    assert queue.claim(wid) is None
    attest(queue, wid, clock() + 10)  # attested again
    claim = queue.claim(wid)
    assert claim is not None and claim.job.id == job_id


PRIVATE_RUN = """
[datasets.tiny]
source = "synthetic"
num_documents = 20

[[runs]]
name = "dl"
dataset = "tiny"
replicas = 2
rounds = 2
tier = "private"
hyper = { n_layers = 1, d_model = 8, n_heads = 1, seq_len = 8, batch_size = 1 }
"""


def test_a_private_run_s_replica_tasks_inherit_its_tier(queue: JobQueue, clock: FakeClock) -> None:
    """The tier is a scheduling field: the replica tasks' ids are those of a public run."""
    from trainfleet.coordinator.round_plan import replica_tasks
    from trainfleet.manifest.identity import job_id

    queue.apply_manifest(manifest_of(PRIVATE_RUN))
    (run,) = queue.runs_to_open()
    tasks = replica_tasks(run, 0, "ab" * 32, 10, None)
    assert [t.tier for t in tasks] == ["private", "private"]
    public = [t.model_copy(update={"tier": "public"}) for t in tasks]
    assert [job_id(t) for t in tasks] == [job_id(t) for t in public]
    assert queue.open_first_round(run.id, "ab" * 32, 10, tasks)
    plain, attested = worker(queue, "plain"), worker(queue, "attested")
    assert queue.claim(plain) is None
    attest(queue, attested, clock() + 60)
    claim = queue.claim(attested)
    assert claim is not None and claim.job.spec.kind == "replica"
