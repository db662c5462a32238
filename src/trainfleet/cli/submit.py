"""``trainfleet submit``: one job into the live queue, without editing the manifest.

Two forms. ``trainfleet submit job.toml``: the file is manifest syntax holding exactly one
``[[jobs]]`` table, plus the ``[datasets.NAME]`` and ``[defaults]`` tables it uses. And a
shortcut for a command job: ``trainfleet submit --name NAME [--after A]... -- ARGV...``,
which writes that table from the flags. Either way the text goes to ``POST /v1/jobs``
(``Client.add_job``); the coordinator parses it with the manifest loader, so the keys and
the errors are a manifest's. A submitted job is kept across reloads.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from trainfleet import env
from trainfleet.cli import render
from trainfleet.cli.common import (
    DEFAULT_STATE,
    JsonOpt,
    StateOpt,
    TokenOpt,
    UrlOpt,
    client,
    console,
    errors,
    fail,
    print_json,
)

COMMAND_LINE = "<command line>"  # the path a shortcut's errors name
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")
_NOT_NAME = re.compile(r"[^A-Za-z0-9._-]+")  # what a manifest name may not hold


def toml_value(value: Any) -> str:
    """``value`` (as ``tomllib`` reads values) written back as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise typer.BadParameter(f"cannot submit a value of type {type(value).__name__}")


def parse_setting(item: str) -> tuple[str, Any]:
    """``key=value`` of ``--set``: the value read as TOML (``60``, ``true``, ``["a"]``,
    ``{ lr = 0.1 }``), else taken as a plain string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise typer.BadParameter(f"--set {item[:80]!r}: expected KEY=VALUE (e.g. timeout_s=600)")
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return key, raw
    return (key, parsed["v"]) if set(parsed) == {"v"} else (key, raw)


def command_job_text(
    name: str,
    argv: list[str],
    after: list[str],
    priority: int | None,
    submitter: str,
    settings: list[str],
) -> str:
    """The ``[[jobs]]`` table of the shortcut's command job."""
    fields: dict[str, Any] = {"name": name, "kind": "command", "command": argv}
    if after:
        fields["after"] = after
    if priority is not None:
        fields["priority"] = priority
    fields["submitter"] = submitter
    lines = ["[[jobs]]"] + [f"{k} = {toml_value(v)}" for k, v in fields.items()]
    for item in settings:
        key, value = parse_setting(item)
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def default_submitter() -> str:
    """``$USER`` made a valid name (``jane.doe@corp`` -> ``jane.doe-corp``: each run of
    other characters becomes ``-``), else 'operator'; ``--submitter`` says it exactly."""
    user = _NOT_NAME.sub("-", os.environ.get("USER", "")).lstrip("._-")[:128].rstrip("-")
    return user or "operator"


def submit(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="FILE | ARGV...",
            help="FILE (one [[jobs]] table), or with --name the command to run, after `--`.",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Shortcut: the command job's name.")
    ] = None,
    after: Annotated[
        list[str] | None,
        typer.Option("--after", help="Shortcut: a job that must complete first (repeatable)."),
    ] = None,
    priority: Annotated[
        int | None, typer.Option("--priority", help="Shortcut: claim priority (higher first).")
    ] = None,
    submitter: Annotated[
        str | None,
        typer.Option(
            "--submitter",
            help="Shortcut: who the job is for (fair share). Default: $USER, else 'operator'.",
            show_default=False,
        ),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Shortcut: any other job key, KEY=VALUE with a TOML value"
            " (timeout_s=600, require_cuda=true); repeatable.",
        ),
    ] = None,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    as_json: JsonOpt = False,
) -> None:
    """Submit one job into the live queue (kept across reloads).

    FILE is manifest syntax holding exactly one `[[jobs]]` table, plus the `[datasets.NAME]`
    and `[defaults]` tables it uses. For a command job, give `--name` and the command after
    `--` instead, e.g.:

        trainfleet submit --name eval-b --after train-a -- python eval.py --ckpt last

    A job with `--after` (or `after = [...]` in FILE) waits until every job it names has
    completed, and fails if one of them fails or is cancelled; `trainfleet explain NAME`
    says what it is waiting for. Prints the job's id and state.
    """
    args = args or []
    shortcut = [after, priority, submitter, settings]
    if name is None:
        if any(v for v in shortcut):
            fail("--after, --priority, --submitter and --set go with --name (the shortcut)", 2)
        if len(args) != 1:
            fail("give one FILE, or --name NAME -- COMMAND... (see --help)", 2)
        path = args[0]
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            fail(f"cannot read {path}: {err.strerror or err}", 2)
        except UnicodeDecodeError as err:
            fail(f"cannot read {path}: not UTF-8 text (byte {err.start})", 2)
    else:
        if not args:
            fail("--name needs the command to run after `--` (see --help)", 2)
        path = COMMAND_LINE
        text = command_job_text(
            name, args, after or [], priority, submitter or default_submitter(), settings or []
        )
    from trainfleet.manifest import parse_manifest  # on use: every command loads this module

    with errors():
        parse_manifest(text, path, external_after=True)  # the loader's checks, first here
        with client(url, token, state_dir) as c:
            job = c.add_job(text, path)
    if as_json:
        print_json(job)
        return
    line = f"submitted {job['name']} ({job['id'][:12]}): {job['state']}"
    if job["state"] == "waiting":
        line += f" for {', '.join(job['spec'].get('after', []))}"
    console.print(render.plain(line))
