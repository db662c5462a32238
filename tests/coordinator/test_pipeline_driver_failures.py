"""The pipeline driver fails a pipeline that can never complete, instead of leaving it
``producing`` forever: a producer job failed for good (nobody else makes its share), or every
consumer job ended with one failed while samples are still uncommitted. A consumer that fails
while another is still running is not fatal: the others take over its partition."""

# ruff: noqa: F811  (the fixture ``started`` is imported, and named by the tests)

from __future__ import annotations

from typing import Any

from test_pipelines_api import Attempt, Started, _quiet_driver, started  # noqa: F401  (fixtures)

from trainfleet.coordinator.pipelines import PipelineDriver


def fail_for_good(started: Started, who: Attempt, error: str) -> None:
    body: dict[str, Any] = {"epoch": who.epoch, "error": error, "retryable": False}
    r = started.api.http.post(f"/v1/jobs/{who.job_id}/fail", json=body, headers=who.worker.auth)
    assert r.status_code == 200, r.text


def test_a_producer_that_failed_for_good_fails_the_pipeline(started: Started) -> None:
    fail_for_good(started, started.producer, "teacher weights unreadable\ntraceback ...")
    PipelineDriver(started.api.coord).tick()
    queue = started.api.coord.queue
    record = queue.get_pipeline("distill")
    assert record.state == "failed"
    assert record.detail == "job distill.producer0 failed: teacher weights unreadable"
    states = {j.name: j.state for j in queue.pipeline_jobs(record.id)}
    assert states["distill.producer0"] == "failed"


def test_a_failed_consumer_is_fatal_only_once_no_consumer_is_left(started: Started) -> None:
    first, second = started.consumers
    fail_for_good(started, first, "student diverged")
    driver = PipelineDriver(started.api.coord)
    driver.tick()
    queue = started.api.coord.queue
    assert queue.get_pipeline("distill").state == "producing"  # consumer 1 takes over
    fail_for_good(started, second, "student diverged again")
    driver.tick()
    record = queue.get_pipeline("distill")
    assert record.state == "failed" and "failed: student diverged" in record.detail
