"""Review of issue 10's market endpoints as an attacker would use them (brief REVIEW10):
referees that send loss arrays built to break the coordinator, uploads larger than any
family, and what a submitter's host may be called. In-process app on SQLite and PostgreSQL
(``test_market_api``'s fixtures)."""

from __future__ import annotations

import hashlib
import struct

import pytest
import test_market_api as market_api
import torch
from test_api import OP, Api, Worker, assert_error
from test_market_api import (
    create,
    host_token,
    model_bytes,
    put_model,
    submission,
    submit,
    upload,
)

from tinymarket import trained

# test_market_api's fixtures (the app on both backends, fixed submission ids, 3 referees)
api, fixed_ids, referees = market_api.api, market_api.fixed_ids, market_api.referees


def test_a_loss_too_large_for_a_float_is_refused_not_a_panel_that_never_decides(
    api: Api, referees: list[Worker]
) -> None:
    """JSON integers have no bound; 10**400 is no float. Taken, it made the report raise
    OverflowError on every tick: the submission stayed 'refereeing' forever."""
    create(api)
    sub = submit(api, trained(5), 3.0).json()
    claim = api.claim(referees[0])
    windows = claim["job"]["spec"]["task"]["windows"]
    huge = {"candidate_losses": [10**400] * windows, "frontier_losses": [1.0] * windows}
    r = api.http.post(
        f"/v1/jobs/{claim['job']['id']}/complete",
        json={"epoch": claim["epoch"], "result": {"referee": huge}},
        headers=referees[0].auth,
    )
    assert "finite" in assert_error(r, 400, "bad_request")["message"]
    assert api.job(claim["job"]["id"])["job"]["state"] in ("claimed", "running")
    assert submission(api, sub["id"])["submission"]["state"] == "refereeing"


def test_a_host_cannot_upload_a_model_larger_than_any_competition_s_family(api: Api) -> None:
    """A host's upload is only worth something as a submission: a gigabyte no family fits
    was stored until the GC came (a disk filled by enrolled hosts). The operator may still
    upload a larger baseline, for a competition yet to be created."""
    alice = host_token(api, "alice")
    tiny = model_bytes(trained(3))
    assert_error(put_model(api, tiny, alice), 413, "payload_too_large")  # no competition yet
    create(api)
    assert put_model(api, tiny, alice).status_code == 200  # the family's size fits
    big = tiny + b"\0" * (1 << 17)  # beyond the family: its tensors and a 64 KiB header
    body = assert_error(put_model(api, big, alice), 413, "payload_too_large")
    assert "larger than any competition's model family" in body["message"]
    assert put_model(api, big, OP).status_code == 200


def test_a_host_named_operator_cannot_submit_as_the_operator(api: Api) -> None:
    """The producer of an operator's submission, and its ledger account, is "operator": a
    host enrolled under that name submitted (and was paid) as if it were the operator."""
    create(api)
    impostor = host_token(api, "operator")
    r = put_model(api, model_bytes(trained(3)), impostor)
    assert "does not submit" in assert_error(r, 401, "unauthorized")["message"]
    sha = upload(api, trained(3))  # by the operator
    url = "/v1/market/competitions/tiny-lm/submissions"
    r = api.http.post(url, json={"sha256": sha, "claim": 3.0}, headers=impostor)
    assert_error(r, 401, "unauthorized")
    assert api.coord.queue.list_submissions("tiny-lm") == []


def test_a_model_download_reads_the_caller_s_jobs_not_every_active_job(
    api: Api, referees: list[Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any worker could ask for any digest, and each ask listed (and parsed) every claimed
    and running job of the queue on the writer: a stall for a busy fleet. The rule is
    unchanged: only a worker holding a referee job that names the model gets it; one whose
    job went back to the queue does not."""
    comp = create(api)
    sub = submit(api, trained(5), 3.0).json()
    claim = api.claim(referees[0])

    def no_scan(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model download listed the queue's jobs")

    monkeypatch.setattr(api.coord.queue, "list_jobs", no_scan)
    for sha in (sub["sha256"], comp["baseline"]):  # the candidate and the frontier
        r = api.http.get(f"/v1/market/models/{sha}", headers=referees[0].auth)
        assert r.status_code == 200, r.text
    other = upload(api, trained(3))  # stored, named by no job of the caller
    assert_error(
        api.http.get(f"/v1/market/models/{other}", headers=referees[0].auth), 403, "forbidden"
    )
    assert_error(
        api.http.get(f"/v1/market/models/{sub['sha256']}", headers=referees[1].auth),
        403,
        "forbidden",
    )
    api.coord.queue.requeue(claim["job"]["id"])  # requeued away from it
    r = api.http.get(f"/v1/market/models/{sub['sha256']}", headers=referees[0].auth)
    assert_error(r, 403, "forbidden")


def test_a_batch_completion_checks_a_referee_s_losses_as_a_single_one_does(
    api: Api, referees: list[Worker]
) -> None:
    """``POST /v1/completions`` took any ``referee`` object (only the single completion
    checked the loss arrays): a referee could finish its job with garbage, unrefused."""
    create(api)
    submit(api, trained(5), 3.0)
    claim = api.claim(referees[0])
    bad = {"referee": {"candidate_losses": [[1.0]], "frontier_losses": [1.0]}}
    item = {"job_id": claim["job"]["id"], "epoch": claim["epoch"], "result": bad}
    r = api.http.post("/v1/completions", json={"results": [item]}, headers=referees[0].auth)
    assert r.status_code == 200, r.text
    [outcome] = r.json()["outcomes"]
    assert outcome["outcome"] == "refused" and "result.referee" in outcome["detail"]
    assert api.job(claim["job"]["id"])["job"]["state"] in ("claimed", "running")


def test_crafted_model_files_are_a_400_before_any_referee(api: Api) -> None:
    """A header length of 2**60, the family's names in float16 or int32, and one extra
    tensor: each refused with its reason (never a 500, never a panel)."""
    create(api)
    alice = host_token(api, "alice")
    good = trained(3)
    crafted = {
        "bomb": struct.pack("<Q", 1 << 60) + b"{}",
        "half": model_bytes({k: v.half() for k, v in good.items()}),
        "int": model_bytes({k: v.int() for k, v in good.items()}),
        "extra": model_bytes({**good, "zz.extra": torch.zeros(4)}),
    }
    url = "/v1/market/competitions/tiny-lm/submissions"
    for what, data in crafted.items():
        assert put_model(api, data, alice).status_code == 200, what
        sha = hashlib.sha256(data).hexdigest()
        r = api.http.post(url, json={"sha256": sha, "claim": 3.0}, headers=alice)
        message = assert_error(r, 400, "bad_request")["message"]
        assert ("not a safetensors file" if what == "bomb" else "does not fit") in message, what
    assert api.coord.queue.list_submissions("tiny-lm") == []
