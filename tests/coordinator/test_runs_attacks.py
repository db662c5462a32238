"""Collaborative runs under a hostile worker, through the in-process HTTP API.

Everything a worker sends with a replica task is untrusted: the pseudo-gradient file (a
crafted safetensors header, values that overflow the outer step, a file far larger than any
codec makes) and the ``contribution`` record (absurd step counts and compute times). Each
must end in a recorded verdict (a 200 with ``result.verdict``) or a 4xx JSON error, never a
500; and whatever it sends, the run's global weights stay finite.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from runkit import (
    DATASET,
    Task,
    claim,
    fake_eval,
    finish,
    run_detail,
    run_toml,
    tick,
    weights,
)
from test_api import OP, Api, Worker, assert_error, serve

from fleetkit import FakeClock
from trainfleet.manifest.runs import CompressionSpec
from trainfleet.train import pseudograd

DATASET_ONLY = DATASET  # a manifest without the run


@pytest.fixture
def api(tmp_path: Path, clock: FakeClock) -> Iterator[Api]:
    with serve(tmp_path, clock) as a:
        a.coord.rounds.evaluate = fake_eval
        yield a


def _round0(api: Api, text: str, hosts: str = "abc") -> tuple[list[Worker], list[Task]]:
    api.reload(text)
    tick(api)
    workers = [api.register(f"cpu-{c}") for c in hosts]
    tasks = [claim(api, w) for w in workers]
    assert all(t is not None for t in tasks)
    return workers, [t for t in tasks if t is not None]


def _start(api: Api, t: Task) -> dict[str, torch.Tensor]:
    return weights(api, t.worker, t.task["weights"])[1]


def _raw(header: dict[str, Any] | str, payload: bytes = b"") -> bytes:
    """A safetensors-shaped file with exactly this header text."""
    text = header if isinstance(header, str) else json.dumps(header)
    head = text.encode()
    return struct.pack("<Q", len(head)) + head + payload


def _verdict(job: dict[str, Any]) -> dict[str, Any]:
    assert job["state"] == "completed"
    verdict: dict[str, Any] = job["result"]["verdict"]
    return verdict


def _all_finite(api: Api, sha: str) -> bool:
    tensors = safetensors.torch.load(api.coord.store.read_bytes(sha))
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


# the pseudo-gradient file ----------------------------------------------------------------
def test_a_header_with_a_5000_digit_number_is_refused_not_a_500(api: Api) -> None:
    _workers, tasks = _round0(api, run_toml(replicas=1, min_quorum=1), hosts="a")
    data = _raw('{"__metadata__": {"format": "x"}, "a": ' + "9" * 5000 + "}")
    verdict = _verdict(finish(api, tasks[0], data=data))
    assert verdict["status"] == "refused" and "malformed" in verdict["reason"]


def test_a_deeply_nested_header_is_refused_not_a_500(api: Api) -> None:
    _workers, tasks = _round0(api, run_toml(replicas=1, min_quorum=1), hosts="a")
    data = _raw('{"a": ' + "[" * 20_000 + "]" * 20_000 + "}")  # within the size limit
    verdict = _verdict(finish(api, tasks[0], data=data))
    assert verdict["status"] == "refused" and "malformed" in verdict["reason"]


@pytest.mark.parametrize(
    "header",
    [
        {"__metadata__": {"format": pseudograd.FORMAT, "codec": "none", "density": "1"}},
        {
            "__metadata__": {
                "format": pseudograd.FORMAT,
                "codec": "topk",
                "density": "nan",
                "bits": "8",
            }
        },
        {
            "__metadata__": {
                "format": pseudograd.FORMAT,
                "codec": "int8",
                "density": "0.01",
                "bits": "9" * 5000,
            }
        },
        {"__metadata__": [1, 2]},
        [1, 2, 3],
        "null",
    ],
)
def test_a_crafted_codec_header_is_refused_with_a_reason(api: Api, header: Any) -> None:
    _workers, tasks = _round0(api, run_toml(replicas=1, min_quorum=1), hosts="a")
    verdict = _verdict(finish(api, tasks[0], data=_raw(header)))
    assert verdict["status"] == "refused" and verdict["reason"]


def test_a_dense_topk_with_an_index_past_int32_is_refused(api: Api) -> None:
    _workers, tasks = _round0(api, run_toml(replicas=1, min_quorum=1), hosts="a")
    start = _start(api, tasks[0])
    spec = CompressionSpec(kind="topk", density=1.0, bits=32)
    data = pseudograd.encode(start, {k: v * 0.5 for k, v in start.items()}, spec).data
    tensors = safetensors.torch.load(data)
    name = sorted(k for k in tensors if k.startswith("i/"))[0]
    tensors[name] = tensors[name].clone()
    tensors[name][0] = -(2**31)  # int32 min: out of range, and 'negative' after any cast
    meta = {"format": pseudograd.FORMAT, "codec": "topk", "density": "1.0", "bits": "32"}
    bad = safetensors.torch.save(tensors, metadata=meta)
    verdict = _verdict(finish(api, tasks[0], data=bad))
    assert verdict["status"] == "refused" and "index" in verdict["reason"]


def test_a_file_far_larger_than_any_codec_makes_is_refused_without_being_read(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    _workers, tasks = _round0(api, run_toml(replicas=1, min_quorum=1), hosts="a")
    start = _start(api, tasks[0])
    limit = pseudograd.default_max_bytes(start)
    big = _raw("{}", b"\0" * (limit + 1))
    reads: list[str] = []
    store = api.coord.store
    real = store.read_bytes

    def spy(sha: str) -> bytes:
        reads.append(sha)
        return real(sha)

    monkeypatch.setattr(store, "read_bytes", spy)
    verdict = _verdict(finish(api, tasks[0], data=big))
    assert verdict["status"] == "refused" and "exceeds" in verdict["reason"]
    assert hashlib.sha256(big).hexdigest() not in reads  # sized, not loaded into memory


def test_huge_finite_end_weights_never_make_the_global_weights_non_finite(api: Api) -> None:
    # One replica: no median to screen against. Its 'none' file holds finite fp32 weights
    # near the fp32 maximum, so (start - end) is finite but the outer step overflows fp32.
    _workers, tasks = _round0(api, run_toml(replicas=1, min_quorum=1, rounds=2), hosts="a")
    start = _start(api, tasks[0])
    end = {k: torch.full_like(v, 3.0e38) for k, v in start.items()}
    data = pseudograd.encode(start, end, CompressionSpec()).data
    verdict = _verdict(finish(api, tasks[0], data=data))
    assert verdict["status"] in ("accepted", "refused")
    detail = tick(api)
    r0 = detail["rounds"][0]
    assert r0["state"] == "closed"
    assert _all_finite(api, r0["next_weights"])
    assert _all_finite(api, detail["run"]["weights"])
    if detail["run"]["momentum"]:
        assert _all_finite(api, detail["run"]["momentum"])
    (c,) = detail["contributions"]
    assert c["status"] == "refused" and c["reason"]


def test_a_codec_denser_than_the_runs_is_refused_and_a_sparser_one_accepted(api: Api) -> None:
    # The run asks int8; a replica may pick a sparser codec for its link, never fp32.
    toml = run_toml(replicas=2, min_quorum=2, compression="int8")
    _workers, tasks = _round0(api, toml, hosts="ab")
    start = _start(api, tasks[0])
    end = {k: v - 0.01 for k, v in start.items()}
    dense = pseudograd.encode(start, end, CompressionSpec()).data
    verdict = _verdict(finish(api, tasks[0], data=dense))
    assert verdict["status"] == "refused"
    assert "denser than the run's int8" in verdict["reason"]
    sparse = pseudograd.encode(start, end, CompressionSpec(kind="topk", density=0.1)).data
    assert _verdict(finish(api, tasks[1], data=sparse))["status"] == "accepted"


# the contribution record -----------------------------------------------------------------
@pytest.mark.parametrize(
    "said",
    [
        {"inner_steps_done": -5, "compute_s": -1.0},
        {"inner_steps_done": 1e308, "compute_s": 1e308},
        {"inner_steps_done": "4", "compute_s": "fast"},
        {"inner_steps_done": True, "compute_s": [1]},
        {"inner_steps_done": 10**30, "compute_s": -1e308},
    ],
)
def test_absurd_step_counts_and_compute_times_stay_in_range(api: Api, said: dict[str, Any]) -> None:
    _workers, tasks = _round0(
        api,
        run_toml(replicas=1, min_quorum=1, rounds=3, adaptive_inner_steps=True),
        hosts="a",
    )
    job = finish(
        api,
        tasks[0],
        said=said,
        inner_steps_done=said["inner_steps_done"],
        compute_s=said["compute_s"],
    )
    assert _verdict(job)["status"] == "accepted"
    detail = tick(api)
    (c,) = detail["contributions"]
    assert 0 <= c["inner_steps_done"] <= tasks[0].task["inner_steps"]
    assert c["compute_s"] is None or 0 <= c["compute_s"] < 1e9
    r1 = detail["rounds"][1]
    assert r1["target_s"] is None or 0 < r1["target_s"] < 1e9
    t = claim(api, tasks[0].worker)
    assert t is not None
    target = t.task["target_s"]
    assert target is None or 0 < target < 1e9
    assert target == r1["target_s"]


def test_nan_and_infinity_literals_in_a_result_are_a_400(api: Api) -> None:
    workers, tasks = _round0(api, run_toml(replicas=1, min_quorum=1), hosts="a")
    t = tasks[0]
    for literal in ("NaN", "Infinity", "-Infinity"):
        body = (
            f'{{"epoch": {t.epoch}, "result": {{"metrics": {{"compute_s": {literal}}},'
            f' "contribution": {{"inner_steps_done": {literal}}}}}}}'
        )
        r = api.http.post(
            f"/v1/jobs/{t.job_id}/complete",
            content=body,
            headers={**workers[0].auth, "content-type": "application/json"},
        )
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]
    assert api.job(t.job_id)["job"]["state"] in ("claimed", "running")


def test_a_stale_attempt_cannot_complete_a_reclaimed_slot(api: Api) -> None:
    workers, tasks = _round0(api, run_toml(replicas=1, min_quorum=1), hosts="a")
    old = tasks[0]
    api.clock.advance(11)  # past the heartbeat timeout: the claim is reaped
    api.reap()  # the reaper's pass (a claim no longer reaps: coordinator.state)
    other = api.register("cpu-b")
    api.clock.advance(3)  # past the affinity wait
    new = claim(api, other)
    assert new is not None and new.job_id == old.job_id and new.epoch > old.epoch
    start = _start(api, new)  # the reaped worker may no longer fetch the weights
    data = pseudograd.encode(start, {k: v * 0.9 for k, v in start.items()}, CompressionSpec()).data
    r = api.upload(workers[0], old.job_id, old.epoch, data)
    assert_error(r, 409, r.json()["error"])
    finish(api, new)
    sha = hashlib.sha256(data).hexdigest()
    result = {"artifact": sha, "contribution": {"inner_steps_done": 4}}
    r = api.http.post(
        f"/v1/jobs/{old.job_id}/complete",
        json={"epoch": old.epoch, "result": result},
        headers=workers[0].auth,
    )
    assert 400 <= r.status_code < 500 and r.json()["error"]
    assert len(run_detail(api)["contributions"]) == 1


def test_a_plain_job_with_a_contribution_field_completes_as_a_plain_job(api: Api) -> None:
    worker, job_id = api.claimed()
    result = {"metrics": {"loss": 1.0}, "contribution": {"inner_steps_done": 10**30}}
    r = api.http.post(
        f"/v1/jobs/{job_id}/complete", json={"epoch": 1, "result": result}, headers=worker.auth
    )
    assert r.status_code == 200, r.text
    assert "verdict" not in r.json()["result"]


def test_a_task_of_a_superseded_run_cannot_be_completed(api: Api) -> None:
    workers, tasks = _round0(api, run_toml(replicas=1, min_quorum=1), hosts="a")
    t = tasks[0]
    data = pseudograd.encode(_start(api, t), _start(api, t), CompressionSpec()).data
    assert api.upload(workers[0], t.job_id, t.epoch, data).status_code == 200
    api.reload(run_toml(replicas=1, min_quorum=1, inner_steps=5))  # a new identity
    result = {"artifact": hashlib.sha256(data).hexdigest(), "contribution": {}}
    r = api.http.post(
        f"/v1/jobs/{t.job_id}/complete",
        json={"epoch": t.epoch, "result": result},
        headers=workers[0].auth,
    )
    assert_error(r, 409, "conflict")
    runs = api.http.get("/v1/runs", headers=OP).json()["runs"]
    (old,) = [r for r in runs if r["state"] == "superseded"]
    assert api.coord.queue.run_contributions(old["id"]) == []


# rounds ----------------------------------------------------------------------------------
def test_zero_pseudo_gradients_close_the_round_with_the_weights_unchanged(api: Api) -> None:
    _workers, tasks = _round0(api, run_toml(rounds=2))
    start = _start(api, tasks[0])
    for t in tasks:
        data = pseudograd.encode(start, start, CompressionSpec()).data
        assert _verdict(finish(api, t, data=data))["status"] == "accepted"
    detail = tick(api)
    r0 = detail["rounds"][0]
    assert r0["state"] == "closed" and r0["accepted"] == 3
    assert r0["next_weights"] == r0["weights"]


def test_a_round_where_every_contribution_is_refused_closes_unchanged(api: Api) -> None:
    _workers, tasks = _round0(api, run_toml(rounds=2))
    for t in tasks:
        assert _verdict(finish(api, t, data=b"not safetensors"))["status"] == "refused"
    detail = tick(api)
    r0 = detail["rounds"][0]
    assert r0["state"] == "closed" and r0["refused"] == 3 and r0["accepted"] == 0
    assert r0["next_weights"] == r0["weights"]
    assert "no usable contribution" in r0["detail"]
    assert detail["run"]["state"] == "active" and detail["run"]["round"] == 1


def test_a_task_that_fails_for_good_lets_a_full_quorum_round_close(api: Api) -> None:
    _workers, tasks = _round0(api, run_toml(rounds=2, min_quorum=3, max_failures=1))
    finish(api, tasks[0])
    finish(api, tasks[1])
    t = tasks[2]
    r = api.http.post(
        f"/v1/jobs/{t.job_id}/fail",
        json={"epoch": t.epoch, "error": "dead", "retryable": False},
        headers=t.worker.auth,
    )
    assert r.status_code == 200, r.text
    detail = tick(api)
    r0 = detail["rounds"][0]
    assert r0["state"] == "closed" and r0["accepted"] == 2


# reads -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ref",
    ["..%2F..%2Fetc%2Fpasswd", "a" * 129, "a" * 5000, "%00", "run%0Aname", "[red]x", "-x", "nope"],
)
def test_an_odd_run_reference_is_a_json_4xx(api: Api, ref: str) -> None:
    api.reload(run_toml(replicas=1, min_quorum=1))
    r = api.http.get(f"/v1/runs/{ref}", headers=OP)
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]


@pytest.mark.parametrize(
    "ref", ["..%2F..%2Fq.db", "0" * 63, "0" * 65, "G" * 64, "%2e%2e", "A" * 64]
)
def test_an_odd_weights_digest_is_a_json_4xx(api: Api, ref: str) -> None:
    workers, _tasks = _round0(api, run_toml(replicas=1, min_quorum=1), hosts="a")
    r = api.http.get(f"/v1/weights/{ref}", headers=workers[0].auth)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]


def test_a_worker_cannot_read_momentum_or_pseudo_gradients_as_weights(api: Api) -> None:
    workers, tasks = _round0(api, run_toml(rounds=2))
    for t in tasks:
        finish(api, t)
    detail = tick(api)
    assert detail["run"]["momentum"]
    shas = [detail["run"]["momentum"]] + [c["sha256"] for c in detail["contributions"]]
    for sha in shas:
        r = api.http.get(f"/v1/weights/{sha}", headers=workers[0].auth)
        assert_error(r, 404, "not_found")


def test_a_straggler_of_a_completed_run_is_dropped(api: Api) -> None:
    _workers, tasks = _round0(api, run_toml(rounds=1, min_quorum=2, straggler_wait=0.0))
    api.clock.advance(1)
    finish(api, tasks[0])
    finish(api, tasks[1])
    assert tick(api)["run"]["state"] == "completed"
    verdict = _verdict(finish(api, tasks[2]))
    assert verdict["status"] == "dropped" and "completed" in verdict["reason"]
    detail = tick(api)
    assert detail["run"]["state"] == "completed" and len(detail["rounds"]) == 1


def test_a_paused_runs_task_completes_and_applies_once_resumed(api: Api) -> None:
    text = run_toml(replicas=1, min_quorum=1, rounds=2)
    _workers, tasks = _round0(api, text, hosts="a")
    api.reload(DATASET_ONLY)  # the run leaves the manifest: paused
    assert _verdict(finish(api, tasks[0]))["status"] == "accepted"
    assert tick(api)["rounds"][0]["state"] == "open"  # no close while paused
    api.reload(text)
    detail = tick(api)
    assert detail["rounds"][0]["state"] == "closed" and detail["rounds"][0]["accepted"] == 1


def test_a_round_with_no_contribution_at_its_timeout_stays_open_and_says_so(api: Api) -> None:
    _workers, tasks = _round0(api, run_toml(min_quorum=3, round_timeout_s=30.0))
    api.clock.advance(31)  # every worker went silent: their claims are reaped too
    detail = tick(api)
    r0 = detail["rounds"][0]
    assert r0["state"] == "open" and "0 of 3" in r0["detail"]
    assert detail["run"]["state"] == "active"
    states = {api.job(t.job_id)["job"]["state"] for t in tasks}
    assert states <= {"pending", "claimed", "running"}


def test_only_a_worker_holding_a_task_of_the_round_may_fetch_its_weights(api: Api) -> None:
    # The run's placement (allowed_hosts, CUDA) is checked at the claim; the weights route
    # must not let any other worker read the model.
    workers, tasks = _round0(api, run_toml(replicas=1, min_quorum=1, rounds=2), hosts="a")
    sha = tasks[0].task["weights"]
    outsider = api.register("cpu-z")
    r = api.http.get(f"/v1/weights/{sha}", headers=outsider.auth)
    assert "holds no replica task" in assert_error(r, 403, "forbidden")["message"]
    ok = api.http.get(f"/v1/weights/{sha}", headers=workers[0].auth)
    assert ok.status_code == 200 and hashlib.sha256(ok.content).hexdigest() == sha
    finish(api, tasks[0])  # the task is over: its worker no longer holds it
    assert_error(api.http.get(f"/v1/weights/{sha}", headers=workers[0].auth), 403, "forbidden")


def test_a_lone_replica_whose_norm_jumps_is_refused_against_earlier_rounds(api: Api) -> None:
    # One replica: no round median to screen against, so the rule compares with the median
    # norm applied in the previous round of the same H.
    toml = run_toml(replicas=1, min_quorum=1, rounds=3, outlier_factor=5.0)
    workers, tasks = _round0(api, toml, hosts="a")
    finish(api, tasks[0])
    assert tick(api)["rounds"][0]["state"] == "closed"
    t1 = claim(api, workers[0])
    assert t1 is not None and t1.task["round"] == 1
    start = _start(api, t1)
    huge = {k: v - 1000.0 * (v.abs() + 1e-3) for k, v in start.items()}  # finite, 1000x off
    verdict = _verdict(finish(api, t1, data=pseudograd.encode(start, huge, CompressionSpec()).data))
    assert verdict["status"] == "accepted"  # finite: judged at the close
    detail = tick(api)
    r1 = detail["rounds"][1]
    assert r1["state"] == "closed" and r1["refused"] == 1
    (c,) = [c for c in detail["contributions"] if c["round"] == 1]
    assert c["status"] == "refused" and "median norm of earlier rounds" in c["reason"]
    assert detail["rounds"][2]["weights"] == r1["weights"]  # the step was discarded
