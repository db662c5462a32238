"""The CLI turns user mistakes into one clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainfleet.cli.main import app

runner = CliRunner()
COMMANDS = [
    "serve",
    "join",
    "reload",
    "status",
    "list",
    "show",
    "logs",
    "cancel",
    "requeue",
    "workers",
    "explain",
    "download",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output and "--help" in result.output


def test_a_broken_manifest_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.toml"
    bad.write_text('[[jobs]]\nname = "a"\nlerning_rate = 1\n[[jobs]]\nname = "a"\n')
    result = runner.invoke(app, ["reload", str(bad), "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert f"invalid manifest {bad}" in result.output
    assert "jobs[0] ('a').lerning_rate: Extra inputs are not permitted" in result.output
    assert "duplicate job name" in result.output
    assert "Traceback" not in result.output


def test_a_missing_manifest_file_is_named(tmp_path: Path) -> None:
    result = runner.invoke(app, ["reload", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "cannot read" in result.output


def test_no_coordinator_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["list", "--url", "http://127.0.0.1:9", "--token", "t", "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "cannot reach coordinator at http://127.0.0.1:9" in result.output


def test_no_operator_token_says_where_to_get_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TRAINFLEET_TOKEN", raising=False)
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no operator token" in result.output


def test_serve_refuses_a_busy_port_before_claiming_to_listen(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(
            app, ["serve", "--port", str(port), "--state-dir", str(tmp_path / "s")]
        )
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "coordinator on" not in result.output


def test_join_without_a_token_says_how_to_get_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TRAINFLEET_JOIN_TOKEN", raising=False)
    result = runner.invoke(app, ["join", "http://127.0.0.1:9", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no join token" in result.output
