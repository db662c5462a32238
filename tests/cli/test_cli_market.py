"""``trainfleet market ...``: usage errors, tables, the waiting submit and its exit codes.

The coordinator here is an in-process fake (``httpx.MockTransport`` behind the CLI's own
client) serving scripted JSON, so hostile strings and odd numbers can be put anywhere; the
live commands run in ``tests/e2e/test_market_e2e.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import trainfleet.cli.market as market_cli
from tinymarket import baseline, competition, competition_toml, save, trained
from trainfleet.cli.main import app
from trainfleet.client import Client
from trainfleet.data.prepare import CacheSettings
from trainfleet.verify.referee import heldout_score

runner = CliRunner()
HOSTILE = "\x1b[31mred\x1b]8;;http://x\x07[bold]link[/]"
SID = "5" * 32


def report(index: int, host: str = "ref-a", **kw: Any) -> dict[str, Any]:
    return {
        "submission_id": SID, "index": index, "job_id": "j" * 64, "worker_id": "w", "host": host,
        "ok": True, "mean": 2.0, "lo": 1.9, "hi": 2.1, "improvement": 0.4, "lower": 0.3,
        "certified": True, "reason": f"candidate 2.0000 [1.9, 2.1] ({index})", "created_at": 1.0,
        **kw,
    }  # fmt: skip


def sub(state: str = "refereeing", reports: list[dict[str, Any]] | None = None, **kw: Any) -> Any:
    return {
        "id": SID, "seq": 1, "competition_id": "c" * 64, "sha256": "a" * 64, "size": 10,
        "producer": "alice", "claim": 2.0, "state": state, "frontier": "b" * 64,
        "frontier_score": 2.4, "trusted_score": 2.0 if state == "accepted" else None,
        "improvement": 0.4 if state == "accepted" else None,
        "paid": 40.0 if state == "accepted" else 0.0, "verdict": kw.pop("verdict", ""),
        "created_at": 1.0, "decided_at": None, "reports": reports or [], **kw,
    }  # fmt: skip


def detail(submission: dict[str, Any]) -> dict[str, Any]:
    jobs = [{"id": str(i) * 64, "name": f"tiny-lm.x.referee{i}", "state": "running",
             "host": None, "attempt": 1, "error": None} for i in range(3)]  # fmt: skip
    return {"submission": submission, "referees": jobs}


COMPETITION = {
    "id": "c" * 64, "name": "tiny-lm", "spec": {"rate": 100.0, "referees": 3, "quorum": 2},
    "baseline": "b" * 64, "baseline_score": 2.4, "frontier": "b" * 64, "frontier_score": 2.4,
    "frontier_submission": None, "created_at": 1.0,
}  # fmt: skip


@pytest.fixture
def coordinator(monkeypatch) -> dict[str, Any]:
    """A fake coordinator: ``served["details"]`` are the successive submission details."""
    served: dict[str, Any] = {"requests": [], "details": [], "submitted": sub()}

    def handle(request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        served["requests"].append((method, path))
        if method == "PUT" and path.startswith("/v1/market/models/"):
            data = request.read()
            assert hashlib.sha256(data).hexdigest() == path.rsplit("/", 1)[1]
            return httpx.Response(200, json={"sha256": path.rsplit("/", 1)[1], "size": len(data),
                                             "stored": True})  # fmt: skip
        if method == "POST" and path == "/v1/market/competitions":
            served["created"] = json.loads(request.read())
            return httpx.Response(200, json=COMPETITION)
        if method == "POST" and path.endswith("/submissions"):
            served["body"] = json.loads(request.read())
            return httpx.Response(200, json=served["submitted"])
        if path == f"/v1/market/submissions/{SID}":
            details = served["details"]
            return httpx.Response(200, json=details.pop(0) if len(details) > 1 else details[0])
        if path == "/v1/market/competitions/tiny-lm" and "terms" in served:
            record = {**COMPETITION, "spec": served["terms"]}
            return httpx.Response(200, json={"competition": record, "submissions": []})
        if path == "/v1/market/competitions/tiny-lm/leaderboard":
            entry = sub("accepted", producer=HOSTILE)
            return httpx.Response(200, json={"competition": COMPETITION, "entries": [entry],
                                             "total_paid": 40.0})  # fmt: skip
        if path == "/v1/market/ledger":
            entries = [{"seq": 1, "competition_id": "c" * 64, "submission_id": SID,
                        "account": HOSTILE, "amount": 40.0, "frontier_before": 2.4,
                        "frontier_after": 2.0, "at": 1.0}]  # fmt: skip
            return httpx.Response(
                200, json={"entries": entries, "balances": {HOSTILE: 40.0}, "total_paid": 40.0}
            )
        return httpx.Response(404, json={"error": "not_found", "message": f"no {path}"})

    def fake_client(url: str, token: str | None, state_dir: Path, ca_cert: Any = None) -> Client:
        return Client("http://coord", "t", transport=httpx.MockTransport(handle))

    monkeypatch.setattr(market_cli, "client", fake_client)
    monkeypatch.setattr(market_cli, "POLL_S", 0.0)
    return served


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return save(baseline(), tmp_path / "model.safetensors")


@pytest.mark.parametrize(
    "command", ["create", "submit", "score", "list", "leaderboard", "ledger", "show"]
)
def test_market_commands_explain_themselves(command: str) -> None:
    result = runner.invoke(app, ["market", command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_create_reads_the_toml_uploads_the_baseline_and_says_its_score(
    coordinator: dict[str, Any], model: Path, tmp_path: Path
) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(competition_toml())
    result = runner.invoke(app, ["market", "create", str(toml), "--baseline", str(model)])
    assert result.exit_code == 0, result.output
    assert "competition tiny-lm" in result.output and "scores 2.4000" in result.output
    created = coordinator["created"]
    assert created["spec"]["referees"] == 3 and created["spec"]["dataset"]["name"] == "held"
    assert created["baseline"] == hashlib.sha256(model.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[competition\n", "cannot read"),
        ("[other]\nx = 1\n", "has no [competition] table"),
        (competition_toml().replace("quorum = 2", "quorum = 5"), "quorum 5 > referees 3"),
        (competition_toml().replace("rate = 100.0", "rate = -1.0"), "competition.rate"),
        (competition_toml() + "\n[competition.extra]\nx = 1\n", "competition.extra"),
    ],
)
def test_a_bad_competition_file_is_a_usage_error_before_any_request(
    coordinator: dict[str, Any], model: Path, tmp_path: Path, text: str, said: str
) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    result = runner.invoke(app, ["market", "create", str(toml), "--baseline", str(model)])
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert coordinator["requests"] == []


def test_submit_waits_prints_each_referee_and_exits_0_when_accepted(
    coordinator: dict[str, Any], model: Path
) -> None:
    coordinator["details"] = [
        detail(sub(reports=[report(0)])),
        detail(sub(reports=[report(0), report(2, host=HOSTILE)])),
        detail(sub("accepted", [report(0), report(1), report(2)], verdict="accepted: fine")),
    ]
    args = ["market", "submit", str(model), "--claim", "2.0", "--competition", "tiny-lm"]
    result = runner.invoke(app, [*args, "--wait"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("referee ") >= 3 and "referee 3/3" in out
    assert "\x1b[31m" not in out and "\\x1b[31mred" in out  # a hostile host name is inert
    assert f"submission {SID[:12]}: accepted, paid 40.0000 credits" in out
    assert coordinator["body"] == {
        "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "claim": 2.0,
    }


def test_submit_exits_1_when_rejected_or_a_duplicate_and_3_when_undecided(
    coordinator: dict[str, Any], model: Path
) -> None:
    args = ["market", "submit", str(model), "--claim", "2.0", "--competition", "tiny-lm"]
    coordinator["details"] = [detail(sub("rejected", verdict="inflated claim: x"))]
    result = runner.invoke(app, [*args, "--wait"])
    assert result.exit_code == 1 and "rejected: inflated claim" in result.output
    coordinator["submitted"] = sub("duplicate", verdict="resubmission of the baseline")
    result = runner.invoke(app, args)  # decided at once: no need to wait
    assert result.exit_code == 1 and "duplicate: resubmission" in result.output
    coordinator["submitted"] = sub()
    coordinator["details"] = [detail(sub())]
    result = runner.invoke(app, [*args, "--wait", "--timeout-s", "0"])
    assert result.exit_code == 3 and "refereeing" in result.output
    result = runner.invoke(app, args)  # not waiting: recorded is success
    assert result.exit_code == 0 and f"submission {SID}" in result.output


@pytest.mark.parametrize(
    "extra",
    [["--claim", "nan"], ["--claim", "-1"], ["--claim", "x"], ["--competition", " "]],
)
def test_submit_usage_errors_exit_2_before_any_request(
    coordinator: dict[str, Any], model: Path, extra: list[str]
) -> None:
    args = {"--claim": "2.0", "--competition": "tiny-lm"}
    args.update(dict(zip(extra[::2], extra[1::2], strict=True)))
    flat = [x for kv in args.items() for x in kv]
    result = runner.invoke(app, ["market", "submit", str(model), *flat])
    assert result.exit_code == 2, result.output
    assert coordinator["requests"] == []
    missing = runner.invoke(app, ["market", "submit", "/nonexistent.safetensors", *flat[:4]])
    assert missing.exit_code == 2


def test_leaderboard_ledger_and_show_render_plain_text(coordinator: dict[str, Any]) -> None:
    board = runner.invoke(app, ["market", "leaderboard", "tiny-lm"])
    assert board.exit_code == 0, board.output
    assert "frontier 2.4000" in board.output and "2.0000" in board.output
    book = runner.invoke(app, ["market", "ledger"])
    assert book.exit_code == 0 and "total paid: 40.0000" in book.output
    for out in (board.output, book.output):
        assert "\x1b" not in out and "\x07" not in out
    coordinator["details"] = [
        detail(sub("rejected", [report(0, ok=False, reason=HOSTILE)], verdict="only 1 of 3"))
    ]
    shown = runner.invoke(app, ["market", "show", SID])
    assert shown.exit_code == 0, shown.output
    assert "rejected: only 1 of 3" in shown.output and "\x1b" not in shown.output
    as_json = runner.invoke(app, ["market", "show", SID, "--json"])
    assert json.loads(as_json.output)["submission"]["state"] == "rejected"
    missing = runner.invoke(app, ["market", "leaderboard", "nope"])
    assert missing.exit_code == 1 and "no /v1/market/competitions/nope" in missing.output


def test_score_measures_the_honest_claim_locally_and_a_better_model_scores_lower(
    model: Path, tmp_path: Path
) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(competition_toml())
    better = save(trained(30), tmp_path / "better.safetensors")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    scores = []
    for path in (model, better):
        result = runner.invoke(
            app, ["market", "score", str(path), "--file", str(toml), *cache, "--json"]
        )
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.stdout)["heldout_loss"])
    assert scores[1] < scores[0]
    # What a referee estimates: the same windows-over-the-pool definition, in process.
    spec = market_cli.load_competition(toml)
    direct = heldout_score(
        spec.params(), spec.dataset, baseline(), CacheSettings(directory=tmp_path / "c2")
    )
    assert scores[0] == pytest.approx(direct, abs=1e-6)
    said = runner.invoke(app, ["market", "score", str(better), "--file", str(toml), *cache])
    assert f"--claim {scores[1]:.4f}" in said.output


def test_score_needs_exactly_one_source_of_terms(model: Path) -> None:
    result = runner.invoke(app, ["market", "score", str(model)])
    assert result.exit_code == 2 and "exactly one of" in result.output


def test_score_fetches_the_terms_of_a_named_competition(
    coordinator: dict[str, Any], model: Path, tmp_path: Path
) -> None:
    coordinator["terms"] = competition()
    cache = ["--cache-dir", str(tmp_path / "cache")]
    by_name = runner.invoke(
        app, ["market", "score", str(model), "--competition", "tiny-lm", *cache, "--json"]
    )
    assert by_name.exit_code == 0, by_name.output
    toml = tmp_path / "c.toml"
    toml.write_text(competition_toml())
    by_file = runner.invoke(app, ["market", "score", str(model), "--file", str(toml), *cache])
    assert f"{json.loads(by_name.stdout)['heldout_loss']:.4f}" in by_file.stdout
