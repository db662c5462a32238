"""``trainfleet shares``: the fair-share table and ``--json``, and clean errors. The
coordinator's JSON is served by an in-process fake (``httpx.MockTransport`` behind the CLI's
own client), so hostile strings and odd values can be put anywhere; the real route behind
these replies is ``tests/coordinator/test_fairshare_api.py``'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import trainfleet.cli.fairshare as fairshare_cli
from trainfleet.cli.main import app
from trainfleet.client import Client

runner = CliRunner()
HOSTILE = "\x1b[31mred\x1b]8;;http://x\x07"


def standing(submitter: str, **changes: Any) -> dict[str, Any]:
    return {
        "submitter": submitter,
        "usage_h": 3.21,
        "usage": 0.62,
        "share": 0.5,
        "factor": 0.4234,
        "level": 6,
        "pending": 4,
        "waiting": 1,
        "running": 2,
        **changes,
    }


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fake coordinator behind the CLI's client: set ``served["report"]``."""
    served: dict[str, Any] = {
        "report": {
            "half_life_h": 168.0,
            "interval_s": 5.0,
            "at": 1.0,
            "submitters": [
                standing("alice"),
                standing("bob", usage_h=0.0, level=0),
                standing("carol", usage_h=0.00123, level=1),  # a few seconds of use
            ],
        },
        "status": 200,
    }

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/fair-share":
            return httpx.Response(404, json={"error": "not_found", "message": "no such path"})
        if served["status"] != 200:
            body = {"error": "unauthorized", "message": "wrong operator token"}
            return httpx.Response(served["status"], json=body)
        return httpx.Response(200, json=served["report"])

    def fake_client(url: str, token: str | None, state_dir: Path, ca_cert: Any = None) -> Client:
        return Client("http://coord", "t", transport=httpx.MockTransport(handle))

    monkeypatch.setattr(fairshare_cli, "client", fake_client)
    return served


def cells(output: str, name: str) -> list[str]:
    line = next(ln for ln in output.splitlines() if name in ln)
    return [c.strip() for c in line.split("│")[1:-1]]


def test_shares_prints_one_line_per_submitter(served: dict[str, Any]) -> None:
    result = runner.invoke(app, ["shares"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "half-life 168 h" in result.output
    assert cells(result.output, "alice") == [
        "alice",
        "3.21",
        "62%",
        "50%",
        "0.42",
        "6",
        "4",
        "1",
        "2",
    ]
    assert cells(result.output, "bob")[1:6] == ["0.00", "62%", "50%", "0.42", "0"]
    assert cells(result.output, "carol")[1] == "0.0012"  # not "0.00" beside its 62%


def test_shares_json_is_the_coordinators_reply(served: dict[str, Any]) -> None:
    result = runner.invoke(app, ["shares", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == served["report"]


def test_shares_neutralizes_hostile_strings_and_odd_values(served: dict[str, Any]) -> None:
    served["report"]["submitters"] = [
        standing(HOSTILE, usage_h="lots", level=None, pending=True, factor=10**400)
    ]
    result = runner.invoke(app, ["shares"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    row = cells(result.output, "red")
    assert row[0].startswith("\\x1b[31mred")
    assert (row[1], row[4], row[5], row[6]) == ("-", "-", "-", "-")


def test_shares_reports_a_refusal_cleanly(served: dict[str, Any]) -> None:
    served["status"] = 401
    result = runner.invoke(app, ["shares"])
    assert result.exit_code != 0
    assert "wrong operator token" in result.output
    assert "Traceback" not in result.output
