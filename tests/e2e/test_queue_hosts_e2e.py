"""Jobs requeued by ``trainfleet hosts rotate --revoke-workers`` are shown and counted, as a
revoke's are: listed by the CLI (on stderr: stdout is the new token alone) and added to the
coordinator's requeue metric."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleetkit import make_cap
from trainfleet.client import Client
from trainfleet.errors import Unauthorized
from trainfleet.testing import LiveFleet

pytestmark = pytest.mark.slow

ONE_JOB = '[[jobs]]\nname = "solo"\nkind = "command"\ncommand = ["true"]\n'


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    """The claim below is held without a heartbeat while the CLI starts (seconds on a busy
    machine): a lease no run of this test outlasts, so only the revoke requeues it."""
    with LiveFleet(
        tmp_path, heartbeat_interval_s=0.5, heartbeat_timeout_s=600.0, reap_interval_s=0.25
    ) as live:
        yield live


def requeue_metric(fleet: LiveFleet) -> str:
    text = httpx.get(
        f"{fleet.url}/metrics",
        headers={"Authorization": f"Bearer {fleet.coord.operator_token}"},
        timeout=10,
    ).text
    return next(line for line in text.splitlines() if line.startswith("trainfleet_lost_attempts_"))


def test_rotate_with_revoke_workers_shows_and_counts_the_requeued_job(fleet: LiveFleet) -> None:
    fleet.reload(ONE_JOB)
    with Client(fleet.url, fleet.worker_token("cpu-a")) as host:
        reg = host.register(make_cap("cpu-a").model_dump(mode="json"))
    with Client(fleet.url, reg["token"]) as worker:
        claim = worker.claim()
        assert claim is not None and claim["job"]["name"] == "solo"
        assert requeue_metric(fleet) == "trainfleet_lost_attempts_total 0.0"

        out = fleet.cli("hosts", "rotate", "cpu-a", "--revoke-workers", check=True)
        token = out.stdout.strip()
        assert len(token) >= 40 and "\n" not in token  # stdout: the token alone
        assert f"requeued solo ({claim['job']['id'][:12]})" in out.stderr, out.stderr
        assert fleet.job("solo")["job"]["state"] == "pending"
        assert requeue_metric(fleet) == "trainfleet_lost_attempts_total 1.0"
        with pytest.raises(Unauthorized):
            worker.claim()
    # Without --revoke-workers nothing is requeued, and the reply says so.
    reply = fleet.operator.rotate_host("cpu-a")
    assert reply["requeued"] == [] and reply["host"] == "cpu-a"
