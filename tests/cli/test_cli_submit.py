"""``trainfleet submit`` against a live coordinator (in a thread): a FILE, the command-job
shortcut with ``-- ARGV``, JSON output, and clear errors for user mistakes."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainfleet.cli.main import app
from trainfleet.cli.submit import command_job_text, parse_setting
from trainfleet.testing import LiveFleet

runner = CliRunner()
MANIFEST = '[[jobs]]\nname = "a"\nkind = "command"\ncommand = ["true"]\n'


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    with LiveFleet(tmp_path / "fleet") as live:
        live.reload(MANIFEST)
        yield live


def fleet_cli(fleet: LiveFleet, command: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(
        app, [command, "--url", fleet.url, "--token", fleet.operator_token, *args]
    )
    return result.exit_code, result.output


def run(fleet: LiveFleet, *args: str) -> tuple[int, str]:
    return fleet_cli(fleet, "submit", *args)


def test_the_shortcut_writes_one_command_job_table() -> None:
    text = command_job_text(
        "b", ["python", "-c", 'print("hi")'], ["a"], 3, "alice", ["timeout_s=60", "note=x y"]
    )
    job = tomllib.loads(text)["jobs"][0]
    assert job == {
        "name": "b",
        "kind": "command",
        "command": ["python", "-c", 'print("hi")'],
        "after": ["a"],
        "priority": 3,
        "submitter": "alice",
        "timeout_s": 60,
        "note": "x y",
    }
    # A value that would add TOML of its own is taken as a plain string.
    assert parse_setting('note="x"\n[[jobs]]') == ("note", '"x"\n[[jobs]]')
    assert parse_setting("hyper={ seconds = 1 }") == ("hyper", {"seconds": 1})


def test_submit_a_file_and_the_shortcut(fleet: LiveFleet, tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text('[[jobs]]\nname = "b"\nkind = "command"\ncommand = ["true"]\nafter = ["a"]\n')
    code, out = run(fleet, str(path))
    assert code == 0, out
    assert out.startswith("submitted b (") and out.rstrip().endswith(": waiting for a")
    code, out = run(fleet, "--json", "--name", "c", "--after", "b", "--submitter", "bob",
                    "--", "python", "-c", "print(1)")  # fmt: skip
    assert code == 0, out
    job = json.loads(out)
    assert (job["state"], job["spec"]["command"], job["spec"]["submitter"]) == (
        "waiting",
        ["python", "-c", "print(1)"],
        "bob",
    )
    assert fleet.job("c")["job"]["spec"]["after"] == ["b"]
    code, out = fleet_cli(fleet, "list")
    assert code == 0, out
    assert "c (submitted)" in out and "(removed)" not in out  # kept, not removed by a reload


def test_user_mistakes_get_clear_errors(fleet: LiveFleet, tmp_path: Path) -> None:
    code, out = run(fleet)
    assert code == 2 and "give one FILE, or --name NAME -- COMMAND" in out
    code, out = run(fleet, "--name", "x")
    assert code == 2 and "--name needs the command to run after `--`" in out
    code, out = run(fleet, "--after", "a", str(tmp_path / "f.toml"))
    assert code == 2 and "go with --name" in out
    code, out = run(fleet, str(tmp_path / "missing.toml"))
    assert code == 2 and "cannot read" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[[jobs]]\nname = "x"\nkind = "command"\ncommand = ["true"]\nafter = ["x"]\n')
    code, out = run(fleet, str(bad))
    assert code == 2 and "a job cannot wait for itself" in out
    code, out = run(fleet, "--name", "a", "--", "false")
    assert code == 1 and "the name 'a' is held by a manifest job" in out
    code, out = run(fleet, "--name", "y", "--after", "ghost", "--", "true")
    assert code == 1 and "no job named 'ghost'" in out
    assert "Traceback" not in out
    assert [j["name"] for j in fleet.operator.jobs()] == ["a"]


def test_a_file_that_is_not_utf8_is_a_clear_error(fleet: LiveFleet, tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[jobs]]\nname = "caf\xe9"\nkind = "command"\ncommand = ["true"]\n')
    code, out = run(fleet, str(path))
    assert code == 2 and "not UTF-8 text" in out and "Traceback" not in out
    assert [j["name"] for j in fleet.operator.jobs()] == ["a"]


@pytest.mark.parametrize(
    ("user", "submitter"),
    [("jane.doe@corp.example", "jane.doe-corp.example"), ("CORP\\jane doe", "CORP-jane-doe"),
     ("_svc", "svc"), ("Ω", "operator"), ("", "operator")],
)  # fmt: skip
def test_the_default_submitter_is_user_made_a_valid_name(
    fleet: LiveFleet, monkeypatch: pytest.MonkeyPatch, user: str, submitter: str
) -> None:
    monkeypatch.setenv("USER", user)
    code, out = run(fleet, "--json", "--name", "u", "--", "true")
    assert code == 0, out
    assert json.loads(out)["spec"]["submitter"] == submitter
