"""``trainfleet pipelines`` / ``pipeline show``: the table of counts, one pipeline's detail and
jobs, ``--json``, and clean errors. The coordinator's JSON is served by an in-process fake
(``httpx.MockTransport`` behind the CLI's own client), so hostile strings can be put anywhere;
the real routes behind these replies are ``tests/coordinator/test_pipelines_api.py``'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import trainfleet.cli.pipelines as pipelines_cli
from trainfleet.cli.main import app
from trainfleet.client import Client

runner = CliRunner()
HOSTILE = "\x1b[31mred\x1b]8;;http://x\x07"
PID = "ab" * 32


def record(**changes: Any) -> dict[str, Any]:
    return {
        "id": PID,
        "name": "distill",
        "state": "producing",
        "spec": {
            "name": "distill",
            "teacher": "teacher",
            "samples": 64,
            "top_k": 8,
            "temperature": 2.0,
            "alpha": 0.5,
            "producers": 1,
            "consumers": 2,
            "store": "http",
        },
        "teacher_job": "cd" * 32,
        "teacher_model": "ef" * 32,
        "consumers": 3,
        "in_manifest": True,
        "detail": "",
        "created_at": 1.0,
        "updated_at": 2.0,
        **changes,
    }


COUNTS = {
    "samples": 64,
    "produced": 40,
    "backlog": 27,
    "in_flight": 5,
    "consumed": 33,
    "committed": 20,
    "released": 30,
    "requeued": 3,
    "reproduced": 4,
}


def job(name: str, state: str = "running") -> dict[str, Any]:
    return {
        "id": (name.encode().hex() * 8)[:64],
        "name": name,
        "state": state,
        "in_manifest": False,
        "host": "host-a",
        "attempt": 1,
        "result": None,
    }


@pytest.fixture
def coordinator(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fake coordinator behind the CLI's client: set ``served["record"]``."""
    served: dict[str, Any] = {"record": record(), "paths": []}

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        served["paths"].append(path)
        if path == "/v1/pipelines":
            entry = {"pipeline": served["record"], "counts": COUNTS}
            return httpx.Response(200, json={"pipelines": [entry]})
        if path.startswith("/v1/pipelines/"):
            if path.rsplit("/", 1)[1] not in ("distill", PID):
                return httpx.Response(
                    404, json={"error": "not_found", "message": "no pipeline 'nope'"}
                )
            jobs = [job("distill.producer0"), job("distill.consumer0", "completed")]
            return httpx.Response(
                200, json={"pipeline": served["record"], "counts": COUNTS, "jobs": jobs}
            )
        return httpx.Response(404, json={"error": "not_found", "message": "no such path"})

    def fake_client(url: str, token: str | None, state_dir: Path, ca_cert: Any = None) -> Client:
        return Client("http://coord", "t", transport=httpx.MockTransport(handle))

    monkeypatch.setattr(pipelines_cli, "client", fake_client)
    return served


@pytest.mark.parametrize("args", [["pipelines"], ["pipeline"], ["pipeline", "show"]])
def test_pipeline_commands_explain_themselves(args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert "pipeline" in result.output.lower()


def test_pipelines_lists_state_teacher_counts_and_consumers(
    coordinator: dict[str, Any],
) -> None:
    result = runner.invoke(app, ["pipelines"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    header = next(ln for ln in result.output.splitlines() if "in flight" in ln)
    for col in ("state", "teacher", "produced", "consumed", "released", "backlog", "consumers"):
        assert col in header
    line = next(ln for ln in result.output.splitlines() if "distill" in ln)
    cells = [c.strip() for c in line.split("│")[1:-1]]
    assert cells[:9] == ["distill", "producing", "teacher", "40", "5", "33", "30", "27", "3"]
    assert cells[9] == PID[:12]


def test_pipelines_neutralizes_hostile_strings_and_marks_removed_ones(
    coordinator: dict[str, Any],
) -> None:
    coordinator["record"] = record(name=HOSTILE, in_manifest=False, consumers="many")
    result = runner.invoke(app, ["pipelines"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b[31mred" in result.output and "(removed)" in result.output
    line = next(ln for ln in result.output.splitlines() if "red" in ln)
    assert line.split("│")[-3].strip() == "-"  # a count that is not an integer


def test_pipeline_show_prints_settings_counts_and_jobs(coordinator: dict[str, Any]) -> None:
    result = runner.invoke(app, ["pipeline", "show", "distill"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"pipeline distill ({PID}): producing" in text
    assert "teacher: job teacher, model efefefefefef" in text
    assert "producers: 1, consumers: 3" in text
    assert "produced 40, in_flight 5, consumed 33, committed 20, released 30, backlog 27" in text
    assert "reproduced 4" in text
    assert "distill.producer0" in text and "distill.consumer0" in text
    assert "(removed)" not in text  # pipeline jobs are in no manifest, by design
    assert coordinator["paths"] == ["/v1/pipelines/distill"]


def test_pipeline_show_json_is_the_api_reply(coordinator: dict[str, Any]) -> None:
    result = runner.invoke(app, ["pipeline", "show", "distill", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["counts"] == COUNTS and body["pipeline"]["id"] == PID
    listing = json.loads(runner.invoke(app, ["pipelines", "--json"]).output)
    assert listing == [{"pipeline": record(), "counts": COUNTS}]


def test_an_unknown_or_malformed_pipeline_is_a_clean_error(coordinator: dict[str, Any]) -> None:
    result = runner.invoke(app, ["pipeline", "show", "nope"])
    assert result.exit_code != 0
    assert "no pipeline 'nope'" in result.output and "Traceback" not in result.output
    bad = runner.invoke(app, ["pipeline", "show", "../x"])
    assert bad.exit_code == 2 and "invalid pipeline reference" in bad.output
    assert all(p != "/v1/pipelines/../x" for p in coordinator["paths"])
