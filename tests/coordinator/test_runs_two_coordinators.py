"""Two coordinators on one PostgreSQL database drive one collaborative run: replicas claim
through one and complete through the other, and both round drivers tick at the same time
(worse than the leader rule allows: only the leader ticks). Every round still closes once,
every contribution is applied once, and the run ends at the weights one coordinator alone
reaches on SQLite: a close is one transaction that re-checks that its round is still open."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from runkit import claim, fake_eval, finish, run_detail, run_toml
from starlette.testclient import TestClient
from test_api import JOIN_TOKEN, OP_TOKEN, Api
from test_runs_lifecycle import _final_weights

from fleetkit import FakeClock
from pgkit import require_postgres
from trainfleet.artifacts import ArtifactStore
from trainfleet.coordinator.app import create_app
from trainfleet.coordinator.state import Coordinator
from trainfleet.queue import QueueSettings
from trainfleet.queue.sqlite import PostgresQueue
from trainfleet.testing.postgres import fresh_schema

TEXT = run_toml(replicas=2, rounds=3, min_quorum=2)


@contextmanager
def serve_pg(tmp_path: Path, url: str, clock: FakeClock, artifacts: Path) -> Iterator[Api]:
    """A coordinator app in-process on the PostgreSQL database ``url``, on a shared store."""
    queue = PostgresQueue(url, settings=QueueSettings(heartbeat_timeout_s=10), clock=clock)
    coord = Coordinator(
        queue=queue,
        store=ArtifactStore(artifacts),
        staging_dir=tmp_path / "staging",
        operator_token=OP_TOKEN,
        join_token=JOIN_TOKEN,
    )
    coord.rounds.evaluate = fake_eval
    try:
        with TestClient(create_app(coord)) as http:
            api = Api(http, coord, clock, tmp_path)
            try:
                yield api
            finally:
                api.close()
    finally:
        queue.close()


def tick_both(a: Api, b: Api) -> None:
    """Both round drivers at once, each on its own thread."""
    errors: list[BaseException] = []

    def tick(api: Api) -> None:
        try:
            api.coord.rounds.tick()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=tick, args=(api,)) for api in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


def test_two_coordinators_close_each_round_once(tmp_path: Path) -> None:
    require_postgres()
    alone = _final_weights(tmp_path / "alone", FakeClock(), None)
    clock = FakeClock()
    with ExitStack() as stack:
        url = stack.enter_context(fresh_schema())
        a = stack.enter_context(serve_pg(tmp_path / "a", url, clock, tmp_path / "artifacts"))
        b = stack.enter_context(serve_pg(tmp_path / "b", url, clock, tmp_path / "artifacts"))
        a.reload(TEXT)
        tick_both(a, b)
        wa, wb = a.register("cpu-a"), b.register("cpu-b")
        for _ in range(3):
            ta, tb = claim(a, wa), claim(b, wb)
            assert ta is not None and tb is not None and ta.slot[0] == tb.slot[0]
            clock.advance(5)
            finish(b, ta)  # each completes through the other coordinator
            finish(a, tb)
            tick_both(a, b)
        detail = run_detail(b)
    assert detail["run"]["state"] == "completed"
    assert [(r["round"], r["state"]) for r in detail["rounds"]] == [
        (0, "closed"),
        (1, "closed"),
        (2, "closed"),
    ]
    applied = sorted(c["applied_in_round"] for c in detail["contributions"])
    assert applied == [0, 0, 1, 1, 2, 2]  # every contribution applied exactly once
    assert detail["run"]["weights"] == alone
