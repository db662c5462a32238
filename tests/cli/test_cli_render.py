"""Safe rendering: whatever a worker or a job reported is printed as plain text.

Hostile strings (rich markup, ANSI/CSI/OSC 8 sequences, carriage returns, C0/C1 controls,
bidi overrides) are stored through the real worker API into a live coordinator, then every
read command renders them: exit code 0, no raw ESC byte on stdout, markup printed literally.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fleetkit import make_cap
from trainfleet import env
from trainfleet.cli import render
from trainfleet.cli.main import app
from trainfleet.client import Client
from trainfleet.errors import ApiError
from trainfleet.testing import LiveFleet

NASTY = [
    "[red]x[/]",
    "[/]",
    "[link=http://evil.example]click[/link]",
    "[bold unclosed",
    "\x1b[31mred\x1b[0m",
    "\x1b]8;;http://evil.example\x1b\\hyperlink\x1b]8;;\x1b\\",
    "progress\r\x1b[2Koverwritten",
    "back\x08\x08space",
    "bell\x07 nul\x00 del\x7f",
    "c1 csi \x9b31m and \x9d osc",
    ":smile: :warning:",
    "\u202eevil\u202c",
    "%s %d {0} {}",
    "tab\tnew\nline",
    "x" * 300,
]
NUM_JOBS = 60

runner = CliRunner()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    with LiveFleet(tmp_path_factory.mktemp("render"), heartbeat_timeout_s=600.0) as live:
        live.reload(
            "".join(
                f'[[jobs]]\nname = "j{i}"\nkind = "command"\ncommand = ["true"]\n'
                for i in range(NUM_JOBS)
            )
        )
        yield live


@pytest.fixture(scope="module")
def worker(fleet: LiveFleet) -> Iterator[Client]:
    cap = make_cap("fuzz-host", cuda=True, vram_gib=8).model_dump(mode="json")
    hostile = {**cap, "hostname": "[/]\x1b[31mbox\x07", "gpu_names": ["[link=x]\x1b]8;;u\x07"]}
    with Client(fleet.url, fleet.worker_token("fuzz-host")) as joiner:
        try:  # what a worker says about itself is shown too, if the coordinator takes it
            token = joiner.register(hostile)["token"]
        except ApiError:
            token = joiner.register(cap)["token"]
    with Client(fleet.url, token) as client:
        yield client


def store(fleet: LiveFleet, worker: Client, text: str, index: int) -> dict[str, Any]:
    """Claim a job and report ``text`` in every worker-chosen field the API takes."""
    claim = worker.claim()
    assert claim is not None, "the fuzz manifest ran out of jobs"
    job_id, epoch = claim["job"]["id"], claim["epoch"]
    worker.append_log(job_id, epoch, [text, f"line {index}: {text}", "[red]x[/]"])
    payload = fleet.tmp / f"artifact-{index}.bin"
    payload.write_bytes(text.encode("utf-8", "replace"))
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    with _refusal_is_fine():  # the API may refuse a hostile name: it must not crash us
        worker.upload(job_id, epoch, payload, digest, text[:100] or "x")
    if index % 2:
        worker.fail(job_id, epoch, text, retryable=False)
    else:
        metrics = {"heldout_loss": 1.0, text[:50] or "k": text, "note": text}
        with _refusal_is_fine():
            worker.complete(job_id, epoch, {"metrics": metrics, "artifact": digest})
    return claim["job"]


class _refusal_is_fine:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, err: object, tb: object) -> bool:
        return isinstance(err, ApiError)


def read_commands(job_id: str) -> list[list[str]]:
    return [
        ["status"],
        ["list"],
        ["show", job_id],
        ["logs", job_id],
        ["workers"],
        ["explain", job_id],
        ["list", "--json"],
        ["show", job_id, "--json"],
    ]


def run(fleet: LiveFleet, args: list[str]) -> Any:
    result = runner.invoke(
        app, args, env={env.URL: fleet.url, env.TOKEN: fleet.coord.operator_token}
    )
    assert result.exit_code == 0, (args, result.output, result.exception)
    assert "\x1b" not in result.stdout, (args, result.stdout)
    assert "\x9b" not in result.stdout and "\x07" not in result.stdout, args
    return result


_counter = itertools.count()


def check_rendered(fleet: LiveFleet, worker: Client, text: str) -> None:
    job = store(fleet, worker, text, next(_counter))
    for args in read_commands(job["id"]):
        run(fleet, args)


@pytest.mark.slow
@pytest.mark.parametrize("text", NASTY)
def test_read_commands_print_hostile_strings_as_plain_text(
    fleet: LiveFleet, worker: Client, text: str
) -> None:
    check_rendered(fleet, worker, text)


@pytest.mark.slow
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60))
def test_read_commands_survive_any_reported_text(
    fleet: LiveFleet, worker: Client, text: str
) -> None:
    check_rendered(fleet, worker, text)


@pytest.mark.slow
def test_logs_show_markup_literally_and_raw_opts_out(fleet: LiveFleet, worker: Client) -> None:
    job = store(fleet, worker, "\x1b[31mred\x1b[0m [bold]b[/bold]", 10_000)
    shown = run(fleet, ["logs", job["id"]]).stdout
    assert "\\x1b[31mred\\x1b[0m [bold]b[/bold]" in shown  # visible, not interpreted
    assert "[red]x[/]" in shown
    raw = runner.invoke(
        app,
        ["logs", job["id"], "--raw"],
        env={env.URL: fleet.url, env.TOKEN: fleet.coord.operator_token},
    )
    assert raw.exit_code == 0 and "\x1b[31mred\x1b[0m" in raw.stdout


@pytest.mark.slow
def test_show_prints_markup_in_events_and_names_literally(fleet: LiveFleet, worker: Client) -> None:
    job = store(fleet, worker, "[link=http://evil.example]boom[/link] [/]", 10_001)  # fails
    out = run(fleet, ["show", job["id"]]).stdout
    assert "[link=http://evil.example]boom[/link]" in out.replace("\n", "")


@pytest.mark.parametrize("command", ["show", "logs", "explain", "download", "cancel", "requeue"])
@pytest.mark.parametrize("ref", ["", "   "])
def test_an_empty_job_reference_is_a_clear_usage_error(command: str, ref: str) -> None:
    result = runner.invoke(app, [command, ref, "--url", "http://127.0.0.1:9", "--token", "t"])
    assert result.exit_code == 2
    assert "empty job reference" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_clean_neutralizes_every_control_but_newline_and_tab() -> None:
    hostile = "".join(chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)])
    cleaned = render.clean(hostile + "\u202e\ud800")
    assert [c for c in cleaned if not c.isprintable()] == ["\t", "\n"]
    assert "\\x1b" in cleaned and "\\x9b" in cleaned and "\\u202e" in cleaned
    assert "\\ud800" in cleaned
    assert render.clean("plain [red]text[/]") == "plain [red]text[/]"


def test_tables_take_markup_and_odd_types_without_crashing() -> None:
    from rich.console import Console

    console = Console(file=open(Path("/dev/null"), "w"), width=100)  # noqa: SIM115
    job = {
        "id": "[/]" * 5,
        "name": "[/]",
        "state": "[link=x]",
        "host": "\x1b]8;;u\x1b\\h",
        "attempt": "[/]",
        "result": {"metrics": {"heldout_loss": "[/]", "tokens_per_s": True}, "artifact": 5},
        "in_manifest": False,
    }
    console.print(render.jobs_table([job], title="[/] title"))
    console.print(
        render.events_table(
            [
                {
                    "at": 0,
                    "kind": "[/]",
                    "from_state": "[",
                    "to_state": "]",
                    "worker_id": "[/]",
                    "epoch": "[/]",
                    "detail": "[/]",
                }
            ]
        )
    )
    console.file.close()
    assert render.state("[/]").plain == "[/]"


@pytest.mark.parametrize(
    "result",
    [
        {"metrics": {"heldout_loss": 10**400, "tokens_per_s": -(10**400)}},
        {"metrics": "not an object"},
        {"metrics": ["a", "list"]},
        "not an object",
    ],
)
def test_the_jobs_table_survives_any_stored_result(result: object) -> None:
    """Results stored before the API bounded them (or by any other backend) still list."""
    from rich.console import Console

    out = io.StringIO()
    job = {"id": "ab" * 32, "name": "j", "state": "completed", "attempt": 1, "result": result}
    Console(file=out, width=120).print(render.jobs_table([job]))
    assert "abababab" in out.getvalue()
