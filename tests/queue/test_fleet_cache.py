"""The claim's in-memory caches (``fleet_cache``): a second claim parses no worker row nor
job spec again, and every change that matters reaches the next claim: a host policy change
(a reload here, or another coordinator's, within ``REFRESH_S``), a revoke, a deregister, and
a spec rewritten under the same job id."""

from __future__ import annotations

from typing import Any

import pytest

from fleetkit import make_cap, manifest_of
from trainfleet.errors import Unauthorized
from trainfleet.queue import JobQueue
from trainfleet.queue.fleet_cache import REFRESH_S, SPECS, FleetCache

JOBS = """
[hosts.cpu-a]
deny_jobs = ["secret-*"]
[[jobs]]
name = "secret-1"
priority = 5
[[jobs]]
name = "open-1"
[[jobs]]
name = "open-2"
"""


def fleet(queue: JobQueue) -> FleetCache:
    cache = getattr(queue, "fleet", None)
    assert isinstance(cache, FleetCache)
    return cache


def worker(queue: JobQueue, host: str = "cpu-a") -> str:
    record, _ = queue.register_worker(make_cap(host))
    return record.id


def finish(queue: JobQueue, w: str) -> str:
    claim = queue.claim(w)
    assert claim is not None
    queue.heartbeat(claim.job.id, w, claim.epoch)
    queue.complete(claim.job.id, w, claim.epoch, {})
    return claim.job.name


def test_a_second_claim_reads_the_worker_from_memory(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(JOBS))
    w = worker(queue)
    assert finish(queue, w) == "open-1"  # secret-1 is denied on cpu-a
    loads = fleet(queue).loads
    assert finish(queue, w) == "open-2"
    assert fleet(queue).loads == loads
    assert w in fleet(queue)


def test_a_host_policy_change_reaches_the_next_claim(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(JOBS))
    w = worker(queue)
    assert finish(queue, w) == "open-1"
    queue.apply_manifest(manifest_of(JOBS.replace('deny_jobs = ["secret-*"]', "")))
    assert finish(queue, w) == "secret-1"  # allowed now, and first by priority


def test_another_coordinators_policy_change_is_seen_within_the_refresh(queue: Any) -> None:
    queue.apply_manifest(manifest_of(JOBS))
    now = [0.0]
    queue.fleet = FleetCache(monotonic=lambda: now[0])
    w = worker(queue)
    assert finish(queue, w) == "open-1"
    # Another coordinator on the same database changes the policy: a write the cache of
    # this one is not told about.
    with queue.db.tx() as conn:
        conn.execute("UPDATE hosts SET policy = ? WHERE name = ?", ("{}", "cpu-a"))
    assert finish(queue, w) == "open-2"  # still the old policy, for under REFRESH_S
    assert queue.claim(w) is None  # secret-1 is left, denied by the policy it remembers
    now[0] += REFRESH_S
    assert finish(queue, w) == "secret-1"


def test_revoke_and_deregister_drop_the_worker(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(JOBS))
    a, b = worker(queue), worker(queue)
    finish(queue, a)
    finish(queue, b)
    assert a in fleet(queue) and b in fleet(queue)
    queue.revoke_worker(a)
    assert a not in fleet(queue)
    with pytest.raises(Unauthorized):
        queue.claim(a)
    queue.deregister_worker(b)
    assert b not in fleet(queue)


def test_a_spec_rewritten_under_its_id_is_parsed_again(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\nmax_failures = 2'))
    before = queue.get_job("j")
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\nmax_failures = 5'))
    after = queue.get_job("j")
    assert after.id == before.id  # max_failures is not part of the job's identity
    assert (before.spec.max_failures, after.spec.max_failures) == (2, 5)
    parses = SPECS.parses
    assert queue.get_job("j").spec.max_failures == 5
    assert SPECS.parses == parses


def test_a_job_written_here_is_claimed_without_parsing_its_spec(queue: JobQueue) -> None:
    """The writer of a job's row keeps the spec it serialized (``scheduling_columns``): the
    job's first claim and its record read no JSON back."""
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "kept-spec"\nhyper = { seed = 41 }'))
    parses = SPECS.parses
    got = queue.claim(worker(queue))
    assert got is not None and got.job.spec.hyper == {"seed": 41}
    assert SPECS.parses == parses
    SPECS.keep(got.job.id, "{}", got.job.spec)  # a text no row holds: the row's is parsed
    assert queue.get_job(got.job.id).spec.hyper == {"seed": 41}
    assert SPECS.parses == parses + 1


def test_a_denied_job_is_judged_once_for_every_worker_of_its_class(queue: JobQueue) -> None:
    """The claim order's head holds a job no claimer of cpu-a may take: each later claim
    passes it with a lookup, not a new ``blockers`` verdict (the scan does not slow down as
    such jobs pile up)."""
    queue.apply_manifest(manifest_of(JOBS + '[[jobs]]\nname = "open-3"\n'))
    a, b = worker(queue), worker(queue)  # one host, one capability: one class
    assert finish(queue, a) == "open-1"  # judged: secret-1 (denied), open-1
    verdicts = fleet(queue).verdicts
    assert finish(queue, b) == "open-2"
    assert fleet(queue).verdicts == verdicts + 1  # open-2 only
    other = worker(queue, "cpu-b")  # another class: judged afresh, and not denied
    assert finish(queue, other) == "secret-1"


def test_a_job_pinned_to_other_hosts_never_reaches_the_claims_check(queue: JobQueue) -> None:
    queue.apply_manifest(
        manifest_of(
            '[[jobs]]\nname = "pinned"\npriority = 9\nallowed_hosts = ["cpu-b"]\n'
            '[[jobs]]\nname = "free"\n'
        )
    )
    a = worker(queue)
    verdicts = fleet(queue).verdicts
    assert finish(queue, a) == "free"
    assert fleet(queue).verdicts == verdicts + 1  # the SQL filter left "pinned" out
    assert finish(queue, worker(queue, "cpu-b")) == "pinned"
