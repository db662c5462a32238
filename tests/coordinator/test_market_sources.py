"""Market submissions whose model is already on the coordinator: a completed job's
``model.safetensors`` (produced by the job's host) and a run round's global weights
(produced by the operator), through the in-process API on real queues.

The jobs are completed through the worker API with packed artifacts built here
(``artifacts.pack_dir``), and the run by a scripted replica (``runkit``), so no training
runs; the referees are ``test_market_api``'s scripted workers.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import test_market_api as market
from runkit import DATASET, claim, fake_eval, finish, run_detail, tick
from test_api import OP, OP_TOKEN, Api, Worker, assert_error
from test_market_api import HONEST_STEPS, create, host_token, ledger, model_bytes, submission
from typer.testing import CliRunner

import trainfleet.cli.market as market_cli
from tinymarket import HYPER, PARAMS, baseline, heldout_mean, misfit, trained
from trainfleet.artifacts import pack_dir
from trainfleet.cli.main import app
from trainfleet.client import Client
from trainfleet.coordinator.market import model_bytes_limit
from trainfleet.coordinator.market_sources import SLACK_BYTES

api, fixed_ids, referees = market.api, market.fixed_ids, market.referees

runner = CliRunner()
URL = "/v1/market/competitions/tiny-lm/submissions"
TRAINER = "trainer-h"
JOBS = """
[[jobs]]
name = "{name}"
hyper = {{ steps = 5 }}
"""


def packed(tmp: Path, files: dict[str, bytes]) -> bytes:
    """A job's output directory holding ``files``, packed as a worker uploads it."""
    out = Path(tempfile.mkdtemp(prefix="out-", dir=tmp))
    for name, data in files.items():
        (out / name).write_bytes(data)
    dest = tmp / f"{out.name}.tar.zst"
    pack_dir(out, dest)
    return dest.read_bytes()


def outputs(tmp: Path, weights: Any) -> bytes:
    """What a gpt train job packs: its model, config and metrics."""
    return packed(
        tmp,
        {
            "model.safetensors": model_bytes(weights),
            "config.json": json.dumps({"recipe": "gpt", "params": HYPER}).encode(),
            "metrics.json": b'{"loss": 2.0}',
        },
    )


def complete_job(api: Api, worker: Worker, name: str, artifact: bytes | None) -> str:
    """Load job ``name`` (a gpt train job), claim it as ``worker`` and complete it with
    ``artifact`` uploaded (None: no artifact); its id."""
    api.reload(JOBS.format(name=name))
    got = api.claim(worker)
    job = got["job"]
    assert job["name"] == name and job["spec"]["recipe"] == "gpt"
    result: dict[str, Any] = {"metrics": {"loss": 2.0}}
    if artifact is not None:
        r = api.upload(worker, job["id"], got["epoch"], artifact)
        assert r.status_code == 200, r.text
        result["artifact"] = hashlib.sha256(artifact).hexdigest()
    r = api.http.post(
        f"/v1/jobs/{job['id']}/complete",
        json={"epoch": got["epoch"], "result": result},
        headers=worker.auth,
    )
    assert r.status_code == 200 and r.json()["state"] == "completed", r.text
    return str(job["id"])


def no_claim(api: Api, worker: Worker) -> None:
    r = api.http.post("/v1/workers/claim", headers=worker.auth)
    assert r.status_code == 200 and r.json() == {"claim": None}, r.text


def test_a_completed_jobs_model_is_refereed_off_its_host_and_pays_that_host(
    api: Api, referees: list[Worker], tmp_path: Path
) -> None:
    comp = create(api)
    trainer = api.register(TRAINER)
    better = trained(HONEST_STEPS)
    job_id = complete_job(api, trainer, "train-1", outputs(tmp_path, better))

    r = api.http.post(URL, json={"job": "train-1", "claim": heldout_mean(better)}, headers=OP)
    assert r.status_code == 200, r.text
    sub = r.json()
    assert (sub["state"], sub["producer"]) == ("refereeing", TRAINER)
    assert sub["sha256"] == hashlib.sha256(model_bytes(better)).hexdigest()
    assert api.coord.store.read_bytes(sub["sha256"]) == model_bytes(better)  # stored by digest
    jobs = submission(api, sub["id"])["referees"]
    assert len(jobs) == 3 and all(j["state"] == "pending" for j in jobs)

    # The producer's host referees none of it, not even with another worker of its own.
    no_claim(api, trainer)
    no_claim(api, api.register(TRAINER))
    task = api.job(jobs[0]["id"])["job"]["spec"]["task"]
    assert task["producer"] == TRAINER

    for worker in referees:
        market.referee(api, worker, tmp_path)
    decided = submission(api, sub["id"])["submission"]
    assert decided["state"] == "accepted" and decided["paid"] > 0, decided["verdict"]
    assert {r["host"] for r in decided["reports"]} == {"ref-a", "ref-b", "ref-c"}
    book = ledger(api)
    assert [(e["account"], e["submission_id"]) for e in book["entries"]] == [(TRAINER, sub["id"])]
    assert book["balances"] == {TRAINER: pytest.approx(decided["paid"])}
    assert comp["baseline_score"] > decided["trusted_score"]

    # The same job again (by id prefix this time) is a resubmission of the paid model.
    again = api.http.post(URL, json={"job": job_id[:12], "claim": 2.0}, headers=OP).json()
    assert again["state"] == "duplicate" and again["producer"] == TRAINER


RUN = (
    DATASET
    + """
[[runs]]
name = "dl"
dataset = "tiny"
hyper = {hyper}
replicas = 1
min_quorum = 1
inner_steps = 2
rounds = 1
"""
)


def test_a_run_rounds_weights_are_submitted_by_the_operator(
    api: Api, referees: list[Worker]
) -> None:
    create(api)
    api.coord.rounds.evaluate = fake_eval
    hyper = "{ " + ", ".join(f"{k} = {v!r}" for k, v in {**HYPER, "seed": 7}.items()) + " }"
    api.reload(RUN.format(hyper=hyper))
    (start,) = tick(api)["rounds"]
    replica = api.register("cpu-a")
    task = claim(api, replica)
    assert task is not None
    finish(api, task)
    detail = tick(api)
    assert detail["run"]["state"] == "completed", detail["run"]
    (r0,) = detail["rounds"]
    assert r0["state"] == "closed" and r0["next_weights"] == detail["run"]["weights"]

    first = api.http.post(URL, json={"run": "dl", "round": 0, "claim": 2.5}, headers=OP).json()
    assert (first["sha256"], first["producer"], first["state"]) == (
        start["weights"],
        "operator",
        "refereeing",
    )
    final = api.http.post(URL, json={"run": "dl", "round": 1, "claim": 2.5}, headers=OP).json()
    assert final["sha256"] == r0["next_weights"] != start["weights"]
    assert final["producer"] == "operator" and final["state"] == "refereeing"
    r = api.http.post(URL, json={"run": "dl", "round": 2, "claim": 2.5}, headers=OP)
    assert "no global weights for round 2" in assert_error(r, 404, "not_found")["message"]
    r = api.http.post(URL, json={"run": "nope", "round": 0, "claim": 2.5}, headers=OP)
    assert_error(r, 404, "not_found")

    # The operator's models: any enrolled host may referee, the replica's host too.
    got = api.claim(replica)
    assert got["job"]["spec"]["kind"] == "referee"
    assert got["job"]["spec"]["task"]["producer"] == "operator"
    assert run_detail(api)["run"]["weights"] == final["sha256"]


def test_a_job_that_holds_no_usable_model_is_refused_before_any_referee(
    api: Api, referees: list[Worker], tmp_path: Path
) -> None:
    create(api)
    trainer = api.register(TRAINER)
    limit = model_bytes_limit(PARAMS)
    artifacts: dict[str, bytes | None] = {
        "no-model": packed(tmp_path, {"metrics.json": b"{}"}),
        "misfit": outputs(tmp_path, misfit()),
        "junk": b"not a packed directory",
        "nothing": None,
        "bad-model": packed(tmp_path, {"model.safetensors": b"not safetensors"}),
        "huge": packed(tmp_path, {"model.safetensors": bytes(limit + 1)}),
        "bomb": packed(
            tmp_path,  # what lies before the model is decompressed too: bounded as well
            {"big.bin": bytes(limit + SLACK_BYTES), "model.safetensors": model_bytes(baseline())},
        ),
    }
    for name, artifact in artifacts.items():
        complete_job(api, trainer, name, artifact)
    before = len(api.coord.queue.list_jobs())

    def refused(job: str, status: int, code: str) -> str:
        r = api.http.post(URL, json={"job": job, "claim": 2.0}, headers=OP)
        return str(assert_error(r, status, code)["message"])

    assert "holds no model.safetensors" in refused("no-model", 400, "bad_request")
    assert "does not fit competition tiny-lm's family" in refused("misfit", 400, "bad_request")
    assert "does not fit the competition's family" in refused("huge", 400, "bad_request")
    assert f"holds more than {limit + SLACK_BYTES} bytes" in refused("bomb", 400, "bad_request")
    assert "not a packed output directory" in refused("junk", 400, "bad_request")
    assert "no stored artifact" in refused("nothing", 404, "not_found")
    assert "not a safetensors file" in refused("bad-model", 400, "bad_request")
    assert refused("never-heard-of", 404, "not_found")

    api.reload(JOBS.format(name="waiting"))
    assert "is pending" in refused("waiting", 400, "bad_request")
    market.submit(api, trained(5), 3.0)  # a referee job: not a train job
    referee_job = next(j for j in api.coord.queue.list_jobs() if j.spec.kind == "referee")
    assert "is a referee" in refused(referee_job.id, 400, "bad_request")
    command = '[[jobs]]\nname = "cmd"\nkind = "command"\ncommand = ["true"]\n'
    api.reload(command)
    assert "only a train job of the gpt recipe" in refused("cmd", 400, "bad_request")

    subs = api.http.get("/v1/market/competitions/tiny-lm", headers=OP).json()["submissions"]
    assert len(subs) == 1  # only the uploaded model's
    assert len(api.coord.queue.list_jobs()) == before + 3 + 2  # its panel and two loaded jobs


def test_only_the_operator_names_a_job_or_a_run_and_a_body_names_one_source(
    api: Api, tmp_path: Path
) -> None:
    create(api)
    trainer = api.register(TRAINER)
    complete_job(api, trainer, "train-1", outputs(tmp_path, baseline()))
    own = host_token(api, TRAINER)
    for body in ({"job": "train-1", "claim": 2.0}, {"run": "dl", "round": 0, "claim": 2.0}):
        r = api.http.post(URL, json=body, headers=own)
        assert "only the operator" in assert_error(r, 403, "forbidden")["message"]
    sha = "ab" * 32
    for body in (
        {"claim": 2.0},
        {"sha256": sha, "job": "train-1", "claim": 2.0},
        {"job": "train-1", "run": "dl", "round": 0, "claim": 2.0},
        {"run": "dl", "claim": 2.0},
        {"round": 0, "claim": 2.0},
        {"run": "dl", "round": -1, "claim": 2.0},
        {"job": "../x", "claim": 2.0},
        {"job": "train-1"},
    ):
        assert_error(api.http.post(URL, json=body, headers=OP), 400, "bad_request")
    r = api.http.post(URL, json={"job": "train-1", "claim": 2.0}, headers=OP)
    assert r.json()["state"] == "duplicate"  # the job's model is the baseline's bytes


def test_market_submit_names_a_job_or_a_run_round_on_the_command_line(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create(api)
    trainer = api.register(TRAINER)
    complete_job(api, trainer, "train-1", outputs(tmp_path, trained(5)))

    def in_process(url: str, token: str | None, state_dir: Path, ca_cert: Any = None) -> Client:
        return Client("http://testserver", OP_TOKEN, transport=api.http._transport)

    monkeypatch.setattr(market_cli, "client", in_process)
    flags = ["--claim", "3.0", "--competition", "tiny-lm"]
    result = runner.invoke(app, ["market", "submit", "--job", "train-1", *flags, "--json"])
    assert result.exit_code == 0, result.output
    sub = json.loads(result.output)["submission"]
    assert (sub["producer"], sub["state"]) == (TRAINER, "refereeing")
    result = runner.invoke(app, ["market", "submit", "--run", "dl", "--round", "0", *flags])
    assert result.exit_code == 1 and "no run" in result.output.lower(), result.output

    model = tmp_path / "m.safetensors"
    model.write_bytes(model_bytes(baseline()))
    for usage in (
        [str(model), "--job", "train-1"],
        ["--run", "dl"],
        ["--round", "0"],
        ["--job", "train-1", "--run", "dl", "--round", "0"],
        [],
    ):
        result = runner.invoke(app, ["market", "submit", *usage, *flags])
        assert result.exit_code == 2, (usage, result.output)
    subs = api.http.get("/v1/market/competitions/tiny-lm", headers=OP).json()["submissions"]
    assert [s["producer"] for s in subs] == [TRAINER]
