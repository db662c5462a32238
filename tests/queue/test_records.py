"""Job records built from our own rows without validation (``sqlite_schema.trusted``, the
writer's hot path) are the records validation would build: equal, with the same JSON, the
same types, frozen, on every backend and in every state a record leaves the queue in."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fleetkit import make_cap, manifest_of
from trainfleet.queue import JobQueue
from trainfleet.queue.base import JobRecord
from trainfleet.queue.sqlite_schema import trusted

JOBS = '[[jobs]]\nname = "a"\n\n[[jobs]]\nname = "b"\n'


def _as_validated(record: JobRecord) -> None:
    again = JobRecord.model_validate(record.model_dump())
    assert record == again
    assert record.model_dump_json() == again.model_dump_json()
    for name in JobRecord.model_fields:  # a float column stays a float, a flag a bool
        assert type(getattr(record, name)) is type(getattr(again, name)), name
    assert record.model_fields_set == again.model_fields_set
    with pytest.raises(ValidationError):
        record.state = "failed"  # type: ignore[misc]  # frozen, as a validated one is


def test_records_from_the_hot_path_equal_validated_ones(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(JOBS))
    w, _ = queue.register_worker(make_cap("cpu-a"))
    _as_validated(queue.get_job("a"))  # pending
    claim = queue.claim(w.id)
    assert claim is not None
    _as_validated(claim.job)  # the claim's record (RETURNING *)
    queue.heartbeat(claim.job.id, w.id, claim.epoch)
    done = queue.complete(claim.job.id, w.id, claim.epoch, {"metrics": {"loss": 0.5}})
    _as_validated(done)  # the completion's record, made from the row read before its UPDATE
    assert done.state == "completed" and done.result == {"metrics": {"loss": 0.5}}
    assert done.finished_at is not None and done.heartbeat_at is not None
    assert done == queue.get_job("a")  # what a later read finds


def test_a_trusted_record_holds_what_it_was_given_unchecked() -> None:
    """The positive control: ``trusted`` does not validate (so only our own rows go
    through it), which is what makes it cheap."""
    fields = {name: None for name in JobRecord.model_fields}
    record = trusted(JobRecord, fields)
    assert record.state is None and record.spec is None
    with pytest.raises(ValidationError):
        JobRecord.model_validate(record.model_dump())
