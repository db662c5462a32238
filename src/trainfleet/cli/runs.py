"""``trainfleet runs`` and ``trainfleet run show|export``: collaborative runs, for people.

A run (``[[runs]]`` in the manifest) trains one model with the whole fleet by DiLoCo rounds
(Douillard et al. 2023, arXiv 2311.08105). ``runs`` lists them; ``run show`` prints one run
and a table of its rounds (who contributed, what was refused or late, the held-out loss the
coordinator measured itself, bytes moved, staleness, wall time), and can draw the held-out
loss curve to a PNG; ``run export`` downloads the run's latest global weights as a checkpoint
that ``trainfleet.train.trainer.load_checkpoint`` loads. Every string that reaches the
terminal goes through :mod:`trainfleet.cli.render` (a worker id or a refusal reason may
carry anything).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
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
    fail,
    print_json,
)

_RUN_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # as the coordinator checks it


def _run_ref(value: str) -> str:
    if not _RUN_REF.match(value):
        raise typer.BadParameter(
            f"invalid run reference {value[:80]!r}: a run name or id (letters, digits, . _ -)"
        )
    return value


RunArg = Annotated[str, typer.Argument(help="Run name (its newest run) or id.", callback=_run_ref)]

run_app = typer.Typer(
    name="run",
    help="One collaborative run: `show` its rounds, `export` its model.",
    no_args_is_help=True,
)


# -- formatting (numbers from the API may be anything JSON allows) -------------------------
def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (not a number, or none a float can hold)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _fmt(value: Any, spec: str = ".4f") -> str:
    number = _number(value)
    return "-" if number is None else format(number, spec)


def human_bytes(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(number) < 1000 or unit == "GB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1000
    raise AssertionError("unreachable")


def _rounds(detail: dict[str, Any]) -> list[dict[str, Any]]:
    rounds = detail.get("rounds")
    return [r for r in rounds if isinstance(r, dict)] if isinstance(rounds, list) else []


def last_heldout_loss(rounds: list[dict[str, Any]]) -> float | None:
    """The held-out loss of the newest round that has one."""
    losses = [n for r in rounds if (n := _number(r.get("heldout_loss"))) is not None]
    return losses[-1] if losses else None


def _total(rounds: list[dict[str, Any]], key: str) -> int:
    return int(sum(_number(r.get(key)) or 0 for r in rounds))


def runs_table(details: list[dict[str, Any]]) -> Table:
    """One line per run; each entry is a ``GET /v1/runs/{id}`` reply."""
    table = Table(title="runs", title_justify="left")
    for col in ("run", "state", "round", "replicas", "held-out loss", "up", "down", "id"):
        table.add_column(col, justify="right" if col in ("replicas", "held-out loss") else "left")
    for detail in details:
        run, rounds = detail["run"], _rounds(detail)
        spec = run.get("spec") or {}
        name = render.plain(run.get("name"))
        if not run.get("in_manifest", True):
            name.append(" (removed)", style="dim")
        table.add_row(
            name,
            render.state(run.get("state")),
            render.plain(f"{run.get('round')}/{run.get('num_rounds')}"),
            render.plain(spec.get("replicas", "-")),
            _fmt(last_heldout_loss(rounds)),
            human_bytes(_total(rounds, "bytes_up")),
            human_bytes(_total(rounds, "bytes_down")),
            render.plain(str(run.get("id", ""))[:12]),
        )
    return table


def _staleness(contributions: list[dict[str, Any]], round_no: Any) -> str:
    """The most rounds late a contribution applied at this round's close was."""
    late = [
        int(staleness)
        for c in contributions
        if isinstance(c, dict)
        and c.get("applied_in_round") == round_no
        and (staleness := _number(c.get("staleness"))) is not None
    ]
    return str(max(late)) if late else "-"


def rounds_table(detail: dict[str, Any]) -> Table:
    """One line per round: accepted/refused/late (and dropped), loss, bytes, staleness, wall."""
    contributions = detail.get("contributions") or []
    table = Table(title="rounds", title_justify="left")
    columns = ("round", "state", "accepted/refused/late", "dropped", "held-out loss")
    for col in (*columns, "up", "down", "staleness", "wall s", "detail"):
        table.add_column(col, justify="left" if col in ("state", "detail") else "right")
    for r in _rounds(detail):
        counts = "/".join(str(r.get(k, "-")) for k in ("accepted", "refused", "late_applied"))
        table.add_row(
            render.plain(r.get("round")),
            render.state(r.get("state")),
            render.plain(counts),
            render.plain(r.get("dropped", "-")),
            _fmt(r.get("heldout_loss")),
            human_bytes(r.get("bytes_up")),
            human_bytes(r.get("bytes_down")),
            _staleness(contributions, r.get("round")),
            _fmt(r.get("wall_s"), ".1f"),
            render.plain(r.get("detail") or ""),
        )
    return table


def refusals_table(detail: dict[str, Any]) -> Table:
    """The contributions that were refused or dropped, with their reasons (worker-supplied
    values printed plain)."""
    table = Table(title="refused or dropped contributions", title_justify="left")
    for col in ("round", "replica", "status", "worker", "reason"):
        table.add_column(col)
    for c in detail.get("contributions") or []:
        if c.get("status") not in ("refused", "dropped"):
            continue
        table.add_row(
            render.plain(c.get("round")),
            render.plain(c.get("replica")),
            render.plain(c.get("status")),
            render.plain(c.get("worker_id") or "-"),
            render.plain(c.get("reason") or ""),
        )
    return table


def summary_lines(detail: dict[str, Any]) -> list[str]:
    run = detail["run"]
    spec = run.get("spec") or {}
    compression = spec.get("compression") or {}
    weights = run.get("weights") or "-"
    return [
        f"run {run.get('name')} ({run.get('id')}): {run.get('state')}",
        f"model: {spec.get('model') or spec.get('recipe', '-')}"
        f"  hyper: {json.dumps(spec.get('hyper', {}))}",
        f"round {run.get('round')}/{run.get('num_rounds')}, {spec.get('replicas')} replicas x"
        f" {spec.get('inner_steps')} inner steps, outer lr {spec.get('outer_lr')} momentum"
        f" {spec.get('outer_momentum')}, compression {compression.get('kind', '-')}",
        f"held-out loss: {_fmt(last_heldout_loss(_rounds(detail)))}  weights:"
        f" {str(weights)[:12]} ({human_bytes(run.get('weights_size'))})",
    ]


def write_loss_png(detail: dict[str, Any], path: Path) -> int:
    """Draw the held-out loss per round to ``path`` (PNG); the number of points drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    points = [
        (x, y)
        for r in _rounds(detail)
        if (x := _number(r.get("round"))) is not None
        and (y := _number(r.get("heldout_loss"))) is not None
    ]
    if not points:
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(f"run {render.clean(detail['run'].get('name'))}"[:80])
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return len(points)


# -- commands ---------------------------------------------------------------------------
def list_runs(
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Collaborative runs (DiLoCo): state, round, replicas, last held-out loss, bytes up/down."""
    with errors(), client(url, token, state_dir, ca_cert) as c:
        details = [c.run(r["id"]) for r in c.runs()]
    if as_json:
        print_json(details)
    else:
        console.print(runs_table(details))


@run_app.command("show")
def show(
    name: RunArg,
    png: Annotated[
        Path | None, typer.Option("--png", help="Also draw the held-out loss curve to this PNG.")
    ] = None,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One run: its settings and, per round, contributions accepted/refused/late, held-out
    loss, bytes up/down, staleness and wall time."""
    with errors(), client(url, token, state_dir, ca_cert) as c:
        detail = c.run(name)
    if as_json:
        print_json(detail)
    else:
        for line in summary_lines(detail):
            console.print(render.plain(line), highlight=False)
        console.print(rounds_table(detail))
        refusals = refusals_table(detail)
        if refusals.row_count:
            console.print(refusals)
        for other in detail.get("same_name") or []:
            console.print(
                render.plain(
                    f"also named {other.get('name')}: {str(other.get('id'))[:12]}"
                    f" ({other.get('state')})"
                ),
                highlight=False,
            )
    if png is not None:
        try:
            drawn = write_loss_png(detail, png)
        except OSError as err:
            fail(f"cannot write {png}: {err.strerror or err}")
        if not drawn:
            fail("no held-out loss recorded yet: nothing to draw")
        console.print(render.plain(f"held-out loss curve ({drawn} rounds) in {png}"))


@run_app.command("export")
def export(
    name: RunArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory for model.safetensors + config.json.")
    ],
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
) -> None:
    """Download a run's latest global weights as a checkpoint: OUTPUT/model.safetensors and
    OUTPUT/config.json, the format `trainfleet.train.trainer.save_checkpoint` writes, so
    `trainfleet.train.trainer.load_checkpoint(OUTPUT)` loads the model."""
    from trainfleet.train.recipes import GPTParams

    with errors(), client(url, token, state_dir, ca_cert) as c:
        run = c.run(name)["run"]
        sha = run.get("weights")
        if not isinstance(sha, str) or not sha:
            fail(f"run {render.clean(run.get('name'))} has no global weights yet")
        spec = run.get("spec") or {}
        try:
            params = GPTParams.model_validate(spec.get("hyper") or {})
        except ValueError as err:
            fail(f"run {render.clean(run.get('name'))}: its params do not load: {err}")
        try:
            output.mkdir(parents=True, exist_ok=True)
            size = c.download(sha, output / "model.safetensors", max_bytes=run.get("weights_size"))
            config = {
                "recipe": spec.get("recipe", "gpt"),
                "mode": "full",
                "params": params.model_dump(),
            }
            (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        except OSError as err:
            fail(f"cannot write into {output}: {err.strerror or err}")
    console.print(
        render.plain(
            f"run {run.get('name')} round {run.get('round')}: weights {sha[:12]} ({size} bytes)"
            f" in {output}/model.safetensors, config in {output}/config.json"
        ),
        highlight=False,
    )


__all__ = ["list_runs", "rounds_table", "run_app", "runs_table", "write_loss_png"]
