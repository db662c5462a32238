"""Fixtures of the in-process API tests: the app served on a fake clock (``test_api.serve``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_api import Api, Worker, serve

from fleetkit import FakeClock


@pytest.fixture
def api(tmp_path: Path, clock: FakeClock) -> Iterator[Api]:
    with serve(tmp_path, clock) as a:
        yield a


@pytest.fixture
def running(api: Api) -> tuple[Worker, str]:
    """A worker holding epoch 1 of the job 'solo', already running."""
    worker, job_id = api.claimed()
    r = api.http.post(f"/v1/jobs/{job_id}/heartbeat", json={"epoch": 1}, headers=worker.auth)
    assert r.json()["state"] == "running"
    return worker, job_id
