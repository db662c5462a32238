"""Issue 12's server pieces attacked through a live coordinator (``LiveFleet``: the real app
under uvicorn, real HTTP): ``POST /v1/jobs`` fed what a careless or hostile submitter sends,
dependency graphs bent by reloads, cancels and requeues, and fair-share settings at the
float limits. Each answer is a 4xx JSON error or the contract's outcome, never a 500, and the
queue stays readable afterwards (a value stored but unreadable would break every listing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetkit import make_cap
from livefleet import command_job
from trainfleet.testing import LiveFleet

pytestmark = pytest.mark.slow

MANIFEST = command_job("a", ["true"]) + command_job("gate", ["true"])


def job_text(name: str, *after: str, extra: str = "", arg: str = "x") -> str:
    return command_job(name, ["echo", arg], after=list(after)) + extra


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveFleet]:
    with LiveFleet(tmp_path) as fleet:
        fleet.reload(MANIFEST)
        yield fleet


@pytest.fixture
def http(live: LiveFleet) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {live.operator_token}"}
    with httpx.Client(base_url=live.url, headers=headers, timeout=60) as client:
        yield client


def submit(http: httpx.Client, text: str, **headers: str) -> httpx.Response:
    return http.post("/v1/jobs", json={"text": text}, headers=headers)


def error(response: httpx.Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    """A JSON error with one of these statuses, never a traceback."""
    wanted = status if isinstance(status, tuple) else (status,)
    assert response.status_code in wanted, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert isinstance(body["error"], str) and body["message"]
    assert "Traceback" not in response.text
    return body


def names(http: httpx.Client) -> list[str]:
    """Every job's name: a stored spec that cannot be read back makes this fail."""
    r = http.get("/v1/jobs")
    assert r.status_code == 200, r.text
    return sorted(j["name"] for j in r.json()["jobs"])


SUBMIT_ATTACKS = [
    # (label, raw body or text, status, needle in the message or problems)
    ("0 jobs", {"text": "[defaults]\npriority = 1\n"}, 400, "holds 0 [[jobs]]"),
    ("2 jobs", {"text": job_text("x") + job_text("y")}, 400, "holds 2 [[jobs]]"),
    ("hosts", {"text": "[hosts.h1]\n" + job_text("x")}, 400, "not hosts"),
    ("runs", {"text": "[[runs]]\nname = 'r'\n" + job_text("x")}, 400, "run needs a dataset"),
    ("pipelines", {"text": "[[pipelines]]\n" + job_text("x")}, 400, "pipeline needs a dataset"),
    ("fair_share", {"text": "[fair_share]\nhalf_life_h = 1\n" + job_text("x")}, 400, "fair_share"),
    ("other table", {"text": "[other]\n" + job_text("x")}, 400, "unknown top-level key"),
    ("itself", {"text": job_text("x", "x")}, 400, "cannot wait for itself"),
    ("unknown parent", {"text": job_text("x", "ghost")}, 400, "no job named 'ghost'"),
    ("twice", {"text": job_text("x", "a", "a")}, 400, "names a job twice"),
    ("nan hyper", {"text": job_text("x", extra="hyper = { lr = nan }\n")}, 400, "finite"),
    ("inf timeout", {"text": job_text("x", extra="timeout_s = inf\n")}, 400, "finite"),
    ("huge priority", {"text": job_text("x", extra=f"priority = {2**64}\n")}, 400, "less than"),
    ("bell submitter", {"text": job_text("x", extra='submitter = "a\\u0007"\n')}, 400, "submitter"),
    (
        "long submitter",
        {"text": job_text("x", extra=f'submitter = "{"s" * 129}"\n')},
        400,
        "pattern",
    ),
    ("newline name", {"text": job_text("x").replace('"x"', '"x\\ny"', 1)}, 400, "pattern"),
    ("toml bomb", {"text": "a = " + "[" * 60 + "]" * 60}, 400, "nests deeper"),
    ("text too long", {"text": "#" * (256 * 1024 + 1)}, 400, "at most"),
    ("not text", {"text": ["[[jobs]]"]}, 400, "invalid request body"),
    ("manifest name", {"text": job_text("a", arg="other")}, 409, "held by a manifest job"),
]


def test_bad_submits_get_4xx_json_and_leave_the_queue_readable(
    live: LiveFleet, http: httpx.Client
) -> None:
    for label, body, status, needle in SUBMIT_ATTACKS:
        got = error(http.post("/v1/jobs", json=body), status)
        assert needle in got["message"] + json.dumps(got.get("problems", "")), (label, got)
        assert names(http) == ["a", "gate"], label
    # bytes that are not JSON text, and a body past the request limit
    raw = {"content-type": "application/json"}
    error(http.post("/v1/jobs", content=b'{"text": "\xff\xfe"}', headers=raw), 400)
    error(http.post("/v1/jobs", content=b'{"text": "\\ud800"}', headers=raw), 400)
    error(http.post("/v1/jobs", content=b"[" * (17 * 2**20), headers=raw), 413)
    # a reload with what JSON cannot store is refused the same way, before anything changes
    for extra in ("hyper = { lr = inf }\n", f"priority = {-(2**63) - 1}\n"):
        r = http.post("/v1/manifest", json={"text": MANIFEST + extra})
        assert "a" in json.dumps(error(r, 400).get("problems", ""))
    assert names(http) == ["a", "gate"]


def test_only_the_operator_token_submits(live: LiveFleet, http: httpx.Client) -> None:
    _, worker_token = live.coord.queue.register_worker(make_cap("h1"))
    join_token = live.worker_token("h2")
    for token in (worker_token, join_token, "-", "x" * 10_000):
        r = httpx.post(
            f"{live.url}/v1/jobs",
            json={"text": job_text("x")},
            headers={"Authorization": f"Bearer {token}"},
        )
        error(r, (401, 403))
    error(httpx.post(f"{live.url}/v1/jobs", json={"text": job_text("x")}), 401)
    assert names(http) == ["a", "gate"]


def test_names_and_identities_cannot_be_taken_twice(live: LiveFleet, http: httpx.Client) -> None:
    assert submit(http, job_text("s")).status_code == 201
    error(submit(http, job_text("s", arg="other")), 409)  # an unfinished submitted job's name
    live.operator.cancel("s")  # its name is free now, but the same job again is not new
    assert "already holds this job" in error(submit(http, job_text("s")), 409)["message"]
    # a manifest job removed by a reload but unfinished keeps its name
    live.reload(command_job("gate", ["true"]))
    body = error(submit(http, job_text("a", arg="new")), 409)
    assert "an unfinished job" in body["message"]
    # once cancelled, its name is free; a child then waits for the new job of that name
    live.operator.cancel("a")
    assert submit(http, job_text("a", arg="new")).status_code == 201
    assert submit(http, job_text("c", "a")).json()["state"] == "waiting"
    said = http.get("/v1/jobs/c/explain").json()["message"]
    assert said.splitlines()[0] == "waiting for a (pending)"


def test_parents_cancelled_removed_or_requeued_under_a_waiting_child(
    live: LiveFleet, http: httpx.Client
) -> None:
    assert submit(http, job_text("b", "a")).json()["state"] == "waiting"
    assert submit(http, job_text("g", "gate")).json()["state"] == "waiting"
    live.operator.cancel("a")
    b = live.wait_state("b", {"failed"}, 30)
    assert b["error"] == "parent a cancelled: cancelled by operator" and b["attempt"] == 0
    # a parent a reload removes no longer answers to its name: its child fails, saying so
    live.reload(command_job("a", ["true"]))
    g = live.wait_state("g", {"failed"}, 30)
    assert g["error"] == "parent gate does not exist"
    # requeueing the child makes it wait again, for its parent's current job
    live.operator.requeue("a")
    assert live.operator.requeue("b")["state"] == "waiting"
    said = http.get("/v1/jobs/b/explain").json()["message"]
    assert said.splitlines()[0] == "waiting for a (pending)"


def run_one(live: LiveFleet, worker_id: str, name: str) -> None:
    """Claim ``name`` (the only claimable job at its priority) and complete it."""
    queue = live.coord.queue
    live.wait_state(name, {"pending"}, 30)
    claim = queue.claim(worker_id)
    assert claim is not None and claim.job.name == name
    queue.complete(claim.job.id, worker_id, claim.epoch, {})


def test_a_requeue_cannot_close_a_cycle_through_a_reused_name(
    live: LiveFleet, http: httpx.Client
) -> None:
    worker_id = live.coord.queue.register_worker(make_cap("h1"))[0].id
    urgent = "priority = 10\n"
    assert submit(http, job_text("n", extra=urgent)).status_code == 201
    assert submit(http, job_text("r", "n", extra=urgent)).status_code == 201
    run_one(live, worker_id, "n")
    run_one(live, worker_id, "r")  # released by the leader once n completed
    # n is finished, so its name is free: a new n waits for r (and for gate, still pending)
    assert submit(http, job_text("n", "r", "gate", arg="2")).json()["state"] == "waiting"
    # r requeued would wait for the new n, which waits for r: refused, nothing changed
    body = error(http.post("/v1/jobs/r/requeue"), 400)
    assert "dependency cycle r -> n -> r" in body["message"]
    assert live.job("r")["job"]["state"] == "completed"


def test_a_deep_submitted_chain_fails_at_once_with_bounded_reasons(
    live: LiveFleet, http: httpx.Client
) -> None:
    depth = 200
    for i in range(depth):
        parent = f"c{i - 1}" if i else "gate"
        assert submit(http, job_text(f"c{i}", parent)).status_code == 201
    live.operator.cancel("gate")
    last = live.wait_state(f"c{depth - 1}", {"failed"}, 60)
    assert last["error"].startswith(f"parent c{depth - 2} failed: parent c{depth - 3} failed:")
    assert len(last["error"]) < 1100  # quoted, cut: not one level of text per link
    states = {j["state"] for j in http.get("/v1/jobs", params={"state": "waiting"}).json()["jobs"]}
    assert states == set()


@pytest.mark.parametrize(
    "shares",
    ["alice = 1e308\nbob = 1e308\n", "alice = 5e-324\nbob = 1\ncarol = 1\n"],
)
def test_fair_share_weights_at_the_float_limits(
    live: LiveFleet, http: httpx.Client, shares: str
) -> None:
    jobs = "".join(
        job_text(f"{s}-job", extra=f'submitter = "{s}"\n', arg=s) for s in ("alice", "bob", "carol")
    )
    live.reload(f"[fair_share.shares]\n{shares}" + jobs)
    live.coord.queue.fair_share_tick()  # what the leader's tick runs
    r = http.get("/v1/fair-share")
    assert r.status_code == 200, r.text
    report = r.json()["submitters"]
    assert {s["submitter"] for s in report} >= {"alice", "bob", "carol"}
    assert all(0 <= s["level"] <= 10 and 0.0 <= s["factor"] <= 1.0 for s in report)
    said = http.get("/v1/jobs/alice-job/explain")
    assert said.status_code == 200 and "fair share: submitter alice" in said.json()["message"]
    # and through the CLI, as an operator reads it
    out = live.cli("shares", check=True).stdout
    assert "alice" in out and "carol" in out


def test_bad_fair_share_settings_are_refused_by_name(live: LiveFleet, http: httpx.Client) -> None:
    for bad in (
        "half_life_h = 0",
        "half_life_h = nan",
        "half_life_h = inf",
        "interval_s = -1",
        "shares = { alice = 0 }",
        "shares = { alice = -1 }",
        "shares = { alice = inf }",
        'shares = { "a\\nb" = 1 }',
    ):
        r = http.post("/v1/manifest", json={"text": f"[fair_share]\n{bad}\n" + MANIFEST})
        assert "fair_share" in json.dumps(error(r, 400)), bad
    assert names(http) == ["a", "gate"]
