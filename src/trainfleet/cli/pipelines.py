"""``trainfleet pipelines`` and ``trainfleet pipeline show NAME``: disaggregated pipelines, for
people.

A pipeline (``[[pipelines]]`` in the manifest, issue 11) feeds a teacher's features from
producer jobs to student consumer jobs through a feature store; the coordinator keeps only
the refs, in a durable queue. ``pipelines`` lists them with the queue's counts (produced, in
flight, consumed, released, backlog) and the consumer count; ``pipeline show`` prints one
pipeline's settings, its counts and its producer and consumer jobs. Every string that
reaches the terminal goes through :mod:`trainfleet.cli.render`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer
from rich.table import Table

from trainfleet import env
from trainfleet.cli import render
from trainfleet.cli.common import (
    DEFAULT_STATE,
    CaCertOpt,
    JsonOpt,
    StateOpt,
    TokenOpt,
    UrlOpt,
    client,
    console,
    errors,
    print_json,
)

_PIPELINE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")  # as the coordinator checks it

COUNT_COLUMNS = (
    ("produced", "produced"),
    ("in flight", "in_flight"),
    ("consumed", "consumed"),
    ("released", "released"),
    ("backlog", "backlog"),
)


def _pipeline_ref(value: str) -> str:
    if not _PIPELINE_REF.match(value):
        raise typer.BadParameter(
            f"invalid pipeline reference {value[:80]!r}: a pipeline name or id"
            " (letters, digits, . _ -)"
        )
    return value


PipelineArg = Annotated[
    str, typer.Argument(help="Pipeline name (its newest pipeline) or id.", callback=_pipeline_ref)
]

pipeline_app = typer.Typer(
    name="pipeline",
    help="One disaggregated pipeline: `show` its counts and jobs.",
    no_args_is_help=True,
)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> str:
    """A count from the API (any JSON) as text: "-" unless it is an integer."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def pipelines_table(entries: list[dict[str, Any]]) -> Table:
    """One line per pipeline; each entry is ``{pipeline, counts}`` (``GET /v1/pipelines``)."""
    table = Table(title="pipelines", title_justify="left")
    table.add_column("pipeline")
    table.add_column("state")
    table.add_column("teacher")
    for title, _ in COUNT_COLUMNS:
        table.add_column(title, justify="right")
    table.add_column("consumers", justify="right")
    table.add_column("id")
    for entry in entries:
        record, counts = _object(entry.get("pipeline")), _object(entry.get("counts"))
        spec = _object(record.get("spec"))
        name = render.plain(record.get("name", "-"))
        if not record.get("in_manifest", True):
            name.append(" (removed)", style="dim")
        table.add_row(
            name,
            render.state(record.get("state")),
            render.plain(spec.get("teacher", "-")),
            *(_count(counts.get(key)) for _, key in COUNT_COLUMNS),
            _count(record.get("consumers")),
            render.plain(str(record.get("id", ""))[:12]),
        )
    return table


def summary_lines(detail: dict[str, Any]) -> list[str]:
    """The pipeline's identity, settings and counts, one fact per line."""
    record, counts = _object(detail.get("pipeline")), _object(detail.get("counts"))
    spec = _object(record.get("spec"))
    model = record.get("teacher_model")
    lines = [
        f"pipeline {record.get('name')} ({record.get('id')}): {record.get('state')}",
        f"teacher: job {spec.get('teacher', '-')}, model"
        f" {str(model)[:12] if isinstance(model, str) else '-'}",
        f"samples: {spec.get('samples', '-')}, top_k {spec.get('top_k', '-')}, temperature"
        f" {spec.get('temperature', '-')}, alpha {spec.get('alpha', '-')}, store"
        f" {spec.get('store', '-')}",
        f"producers: {spec.get('producers', '-')}, consumers: {_count(record.get('consumers'))}",
        "counts: "
        + ", ".join(
            f"{key} {_count(counts.get(key))}"
            for key in (
                "produced",
                "in_flight",
                "consumed",
                "committed",
                "released",
                "backlog",
                "reproduced",
            )
        ),
    ]
    if record.get("detail"):
        lines.append(f"detail: {record.get('detail')}")
    return lines


# -- commands ---------------------------------------------------------------------------
def list_pipelines(
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Disaggregated pipelines: state, teacher, samples produced, in flight, consumed,
    released, backlog, and the consumer count."""
    with errors(), client(url, token, state_dir, ca_cert) as c:
        entries = c.pipelines()
    if as_json:
        print_json(entries)
    else:
        console.print(pipelines_table(entries))


@pipeline_app.command("show")
def show(
    name: PipelineArg,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One pipeline: its settings, its counts (produced, in flight, consumed, released,
    backlog) and its producer and consumer jobs."""
    with errors(), client(url, token, state_dir, ca_cert) as c:
        detail = c.pipeline(name)
    if as_json:
        print_json(detail)
        return
    for line in summary_lines(detail):
        console.print(render.plain(line), highlight=False)
    # Pipeline jobs are the coordinator's, never a manifest's: not "(removed)" from one.
    jobs = [{**j, "in_manifest": True} for j in detail.get("jobs") or [] if isinstance(j, dict)]
    console.print(render.jobs_table(jobs, title="pipeline jobs"))


__all__ = ["list_pipelines", "pipeline_app", "pipelines_table", "summary_lines"]
