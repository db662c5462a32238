"""The fast path of the hot worker endpoints (``coordinator.fastpath``) answers exactly as the
Starlette routes do: the same table of requests, good and bad, is sent to two coordinators
in the same state, one with the fast path and one without, and every status and JSON body
must match (worker ids and tokens, random per coordinator, are compared by role)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_api import OP, SWEEP, Api, Worker, bearer, serve

from fleetkit import FakeClock
from trainfleet.coordinator import fastpath
from trainfleet.coordinator.auth import SOLE_TOKEN_TTL_S, TOKEN_TTL_S
from trainfleet.coordinator.fastpath import FastPath

# A request: method, path, who sends it, and its body (a JSON value, raw bytes, or None).
Req = tuple[str, str, str, Any]

ALPHA = "{alpha}"  # placeholders, filled in per coordinator
BETA = "{beta}"
LONG_ID = "a" * 257

# Each step is sent to both coordinators, in order; the state each leaves is the same.
SCRIPT: list[Req] = [
    # auth: missing, wrong, the operator's token on a worker route
    ("POST", "/v1/workers/claim", "none", None),
    ("POST", "/v1/workers/claim", "bad", None),
    ("POST", "/v1/workers/claim", "op", None),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "bad", {"epoch": 1}),
    # bodies the claim refuses or coerces
    ("POST", "/v1/workers/claim", "w1", b"{"),
    ("POST", "/v1/workers/claim", "w1", b"[]"),
    ("POST", "/v1/workers/claim", "w1", {"wait_s": -1}),
    ("POST", "/v1/workers/claim", "w1", {"wait_s": 31}),
    ("POST", "/v1/workers/claim", "w1", {"wait_s": True}),
    ("POST", "/v1/workers/claim", "w1", {"nope": 1}),
    ("POST", "/v1/workers/claim", "w1", b'{"wait_s": NaN}'),
    ("POST", "/v1/workers/claim", "w1", b'{"x": "\\ud800"}'),
    ("POST", "/v1/workers/claim", "w1", b"[" * 100 + b"]" * 100),
    # a claim, then the same claim again (redelivered), then a claim with a coerced body
    ("POST", "/v1/workers/claim", "w1", None),
    ("POST", "/v1/workers/claim", "w1", {}),
    ("POST", "/v1/workers/claim", "w1", {"wait_s": "0"}),
    # heartbeats: good, stale, malformed, unknown or odd job references
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w1", {"epoch": 1}),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w1", {"epoch": 1}),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w1", {"epoch": 2}),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w1", {"epoch": 0}),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w1", {"epoch": "1"}),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w1", {"epoch": 1.0}),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w1", {"epoch": True}),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w1", {"epoch": 2**63}),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w1", {}),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w1", {"epoch": 1, "more": 1}),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w2", {"epoch": 1}),
    ("POST", "/v1/jobs/alpha/heartbeat", "w1", {"epoch": 1}),
    ("POST", "/v1/jobs/al%70ha/heartbeat", "w1", {"epoch": 1}),
    ("POST", "/v1/jobs/a%2Fb/heartbeat", "w1", {"epoch": 1}),
    ("POST", "/v1/jobs/%FF/heartbeat", "w1", {"epoch": 1}),
    ("POST", "/v1/jobs/nosuchjob/heartbeat", "w1", {"epoch": 1}),
    ("POST", f"/v1/jobs/{LONG_ID}/heartbeat", "w1", {"epoch": 1}),
    ("POST", "/v1/jobs/{alpha}/heartbeat/", "w1", {"epoch": 1}),
    ("GET", "/v1/jobs/{alpha}/heartbeat", "w1", None),
    # a claim while holding a running job: 409
    ("POST", "/v1/workers/claim", "w1", None),
    # completions: refused results, stale, good, then again
    ("POST", "/v1/jobs/{alpha}/complete", "w1", {"epoch": 1, "result": []}),
    ("POST", "/v1/jobs/{alpha}/complete", "w1", {"epoch": 1, "result": {"metrics": 3}}),
    ("POST", "/v1/jobs/{alpha}/complete", "w1", {"epoch": 1, "result": {"artifact": "f" * 64}}),
    ("POST", "/v1/jobs/{alpha}/complete", "w1", {"epoch": 2, "result": {}}),
    ("POST", "/v1/jobs/{alpha}/complete", "w1", {"result": {}}),
    ("POST", "/v1/jobs/{alpha}/complete", "w1", {"epoch": 1, "result": {"metrics": {"x": 1}}}),
    ("POST", "/v1/jobs/{alpha}/complete", "w1", {"epoch": 1}),
    ("POST", "/v1/jobs/{alpha}/heartbeat", "w1", {"epoch": 1}),
    # the batch endpoints (w2 holds up to 4 jobs)
    ("POST", "/v1/claims", "w2", {"max_jobs": 0}),
    ("POST", "/v1/claims", "w2", {"max_jobs": 65}),
    ("POST", "/v1/claims", "w2", {"max_jobs": "2"}),
    ("POST", "/v1/claims", "w2", {"max_jobs": 2, "x": 1}),
    ("POST", "/v1/claims", "w2", {"max_jobs": 2}),
    ("POST", "/v1/claims", "w2", {"max_jobs": 2, "wait_s": 0.01}),
    ("POST", "/v1/heartbeats", "w2", {"beats": []}),
    ("POST", "/v1/heartbeats", "w2", {"beats": [{"job_id": "{beta}", "epoch": 1}] * 65}),
    ("POST", "/v1/heartbeats", "w2", {"beats": [{"job_id": "{beta}", "epoch": "1"}]}),
    ("POST", "/v1/heartbeats", "w2", {"beats": [{"job_id": "", "epoch": 1}]}),
    ("POST", "/v1/heartbeats", "w2", {"beats": [{"job_id": "{beta}"}]}),
    (
        "POST",
        "/v1/heartbeats",
        "w2",
        {
            "beats": [
                {"job_id": "{beta}", "epoch": 1},
                {"job_id": "{beta}", "epoch": 5},
                {"job_id": "{alpha}", "epoch": 1},
                {"job_id": "nosuchjob", "epoch": 1},
            ]
        },
    ),
    ("POST", "/v1/completions", "w2", {"results": "no"}),
    ("POST", "/v1/completions", "w2", {"results": [{"job_id": "{beta}", "epoch": 1, "x": 1}]}),
    (
        "POST",
        "/v1/completions",
        "w2",
        {
            "results": [
                {"job_id": "{beta}", "epoch": 1, "result": {"metrics": {"loss": 0.5}}},
                {"job_id": "{beta}", "epoch": 1},
                {"job_id": "{alpha}", "epoch": 9},
                {"job_id": "nosuchjob", "epoch": 1, "result": {"metrics": []}},
            ]
        },
    ),
    # nothing left to claim: at once, and after a short long poll
    ("POST", "/v1/workers/claim", "w1", None),
    ("POST", "/v1/workers/claim", "w1", {"wait_s": 0.01}),
    ("POST", "/v1/claims", "w2", {}),
    # a body too large for the fast path: the slow path reads it
    ("POST", "/v1/workers/claim", "w1", {"wait_s": 0, "pad": "x" * 20_000}),
]


@contextmanager
def coordinator(tmp_path: Path, *, fast: bool) -> Iterator[tuple[Api, dict[str, Worker]]]:
    """A coordinator with SWEEP loaded and two workers (w2 with 4 slots), its fast path on or
    off (off: no route is hot, every request goes through Starlette)."""
    with pytest.MonkeyPatch.context() as patch:
        if not fast:
            patch.setattr(fastpath, "PARSERS", {})
        with serve(tmp_path, FakeClock()) as api:
            api.reload(SWEEP)
            w1 = api.register()
            w2 = api.register("cpu-b")
            api.coord.queue.set_worker_slots(w2.id, 4)
            yield api, {"w1": w1, "w2": w2}


def fast_path_of(api: Api) -> FastPath:
    fast: Any = api.http.app.fast  # type: ignore[attr-defined]
    assert isinstance(fast, FastPath)
    return fast


def run_script(api: Api, workers: dict[str, Worker]) -> list[tuple[int, Any]]:
    """Every step's status and body, with ids that differ between coordinators replaced."""
    ids = {j["name"]: j["id"] for j in api.http.get("/v1/jobs", headers=OP).json()["jobs"]}
    fill = {ALPHA: ids["alpha"], BETA: ids["beta"]}
    tokens = {"bad": bearer("not-a-token"), "op": OP, "none": {}}
    tokens |= {name: w.auth for name, w in workers.items()}
    roles = {w.id: f"<{name}>" for name, w in workers.items()}
    out = []
    for method, path, who, body in SCRIPT:
        for key, value in fill.items():
            path = path.replace(key, value)
        if body is not None and not isinstance(body, bytes):
            text = json.dumps(body)
            for key, value in fill.items():
                text = text.replace(key, value)
            body = text.encode()
        r = api.http.request(method, path, content=body, headers=tokens[who])
        text = r.text
        for worker_id, role in roles.items():
            text = text.replace(worker_id, role)
        assert r.headers["content-type"].startswith("application/json"), (path, text)
        out.append((r.status_code, json.loads(text)))
    return out


def test_the_fast_path_answers_as_the_slow_path_does(tmp_path: Path) -> None:
    with coordinator(tmp_path / "slow", fast=False) as (api, workers):
        slow = run_script(api, workers)
        assert fast_path_of(api).served == 0
    with coordinator(tmp_path / "fast", fast=True) as (api, workers):
        fast = run_script(api, workers)
        served = fast_path_of(api).served
    for step, (a, b) in enumerate(zip(slow, fast, strict=True)):
        assert a == b, f"step {step}: {SCRIPT[step][:2]}"
    statuses = {status for status, _ in fast}
    assert {200, 400, 401, 404, 405, 409} <= statuses
    # A good part went the fast way: the good requests after the first (which fills the
    # credential cache) and the errors found after the body check (stale, not found).
    assert served >= 20, served


def test_a_revoke_refuses_the_next_fast_request(tmp_path: Path) -> None:
    with coordinator(tmp_path, fast=True) as (api, workers):
        w1 = workers["w1"]
        claim = api.claim(w1)
        job_id = claim["job"]["id"]
        beat = {"epoch": claim["epoch"]}
        r = api.http.post(f"/v1/jobs/{job_id}/heartbeat", json=beat, headers=w1.auth)
        assert r.status_code == 200, r.text
        served = fast_path_of(api).served
        r = api.http.post(f"/v1/workers/{w1.id}/revoke", headers=OP)
        assert r.status_code == 200, r.text
        r = api.http.post(f"/v1/jobs/{job_id}/heartbeat", json=beat, headers=w1.auth)
        assert r.status_code == 401, r.text
        assert fast_path_of(api).served == served  # the cache was cleared: the slow path
        r = api.http.post("/v1/workers/claim", headers=w1.auth)
        assert r.status_code == 401, r.text


def test_fast_requests_count_in_the_request_metrics(tmp_path: Path) -> None:
    def counted(api: Api) -> dict[str, str]:
        text = api.http.get("/metrics", headers=OP).text
        return {
            line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
            for line in text.splitlines()
            if line.startswith(("trainfleet_http_requests_total", "trainfleet_claims_total"))
            or line.startswith("trainfleet_http_request_seconds_count")
        }

    seen = []
    for fast in (False, True):
        with coordinator(tmp_path / str(fast), fast=fast) as (api, workers):
            run_script(api, workers)
            seen.append(counted(api))
    assert seen[0] == seen[1]
    claims = 'trainfleet_http_requests_total{method="POST",route="/v1/workers/claim",status="200"}'
    assert float(seen[1][claims]) >= 3


def test_a_sole_coordinator_keeps_credentials_cached_past_the_shared_ttl(tmp_path: Path) -> None:
    """On SQLite no other coordinator can revoke behind this one's back, so a fleet beating
    every 20 s keeps its credentials cached (``auth.SOLE_TOKEN_TTL_S``) and its beats go the
    fast way; a revoke here still clears them at once (above)."""
    with coordinator(tmp_path, fast=True) as (api, workers):
        clock = FakeClock()
        api.coord.tokens.clock = clock
        w1 = workers["w1"]
        assert api.http.post("/v1/workers/claim", headers=w1.auth).status_code == 200
        clock.advance(TOKEN_TTL_S + 20)
        assert api.coord.tokens.get("worker", w1.token) == w1.id
        clock.advance(SOLE_TOKEN_TTL_S)
        assert api.coord.tokens.get("worker", w1.token) is None


def test_an_unexpected_error_on_the_fast_path_is_the_apps_json_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The fast path runs in front of Starlette's error middleware, so it answers an
    unexpected error itself, as that middleware would: the app's JSON 500, no details in
    the reply, the error in the log."""
    from starlette.testclient import TestClient

    with coordinator(tmp_path, fast=True) as (api, workers):
        w1 = workers["w1"]
        api.claim(w1)  # the credential is cached: the next claim goes the fast way
        served = fast_path_of(api).served

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the disk is on fire")

        message = "internal error; see the coordinator log"
        # in the route's handler, and before it (the credential cache)
        for target, name in ((api.coord.queue, "claim_many"), (api.coord.tokens, "get")):
            caplog.clear()
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(target, name, broken)
                http = TestClient(api.http.app, raise_server_exceptions=False)
                try:
                    r = http.post("/v1/workers/claim", headers=w1.auth)
                finally:
                    http.close()
            assert r.status_code == 500, (name, r.text)
            assert r.json() == {"error": "internal", "message": message}
            assert "on fire" not in r.text
            assert "the disk is on fire" in caplog.text
        assert fast_path_of(api).served == served + 1  # the handler's: the other never ran
