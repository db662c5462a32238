"""``trainfleet shares``: fair share, for people.

One line per submitter with jobs or recent use (``GET /v1/fair-share``): its decayed
job-hours, its fraction of the fleet's use, its share, Slurm's fair-share factor and the level
its pending jobs are claimed at (lower first, within one priority), and its pending, waiting
and running jobs. Every string that reaches the terminal goes through
:mod:`trainfleet.cli.render`.
"""

from __future__ import annotations

from typing import Any

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


def _count(value: Any) -> str:
    """A count from the API (any JSON) as text: "-" unless it is an integer."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def _number(value: Any, spec: str) -> str:
    """A finite number from the API as ``spec`` says: "-" for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    try:
        return format(float(value), spec)
    except (OverflowError, ValueError):  # an integer too large for a float
        return "-"


def _small(value: Any) -> bool:
    """Use under 0.01 job-hours (36 s) but not 0: shown to 2 significant digits, not 0.00."""
    return isinstance(value, float) and 0 < abs(value) < 0.01


def shares_table(report: dict[str, Any]) -> Table:
    """One line per submitter of a ``FairShareReport``; the half-life in the title."""
    half_life = _number(report.get("half_life_h"), "g")
    table = Table(title=f"fair share (half-life {half_life} h)", title_justify="left")
    table.add_column("submitter")
    for title in ("job-hours", "use", "share", "factor", "level"):
        table.add_column(title, justify="right")
    for title in ("pending", "waiting", "running"):
        table.add_column(title, justify="right")
    rows = report.get("submitters")
    for row in rows if isinstance(rows, list) else []:
        row = row if isinstance(row, dict) else {}
        table.add_row(
            render.plain(row.get("submitter", "-")),
            _number(row.get("usage_h"), ".2g" if _small(row.get("usage_h")) else ".2f"),
            _number(row.get("usage"), ".0%"),
            _number(row.get("share"), ".0%"),
            _number(row.get("factor"), ".2f"),
            _count(row.get("level")),
            *(_count(row.get(key)) for key in ("pending", "waiting", "running")),
        )
    return table


def list_shares(
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fair share: each submitter's recent (decayed) job-hours, share, factor and level.
    Within one priority, jobs of lower levels are claimed first."""
    with errors(), client(url, token, state_dir, ca_cert) as c:
        report = c.fair_share()
    if as_json:
        print_json(report)
    else:
        console.print(shares_table(report))


__all__ = ["list_shares", "shares_table"]
