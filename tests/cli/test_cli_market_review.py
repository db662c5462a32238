"""Review of ``trainfleet market``'s tables (brief REVIEW10): a name from the coordinator is
printed as text, never parsed as rich markup, in a table's title too."""

from __future__ import annotations

from rich.console import Console

from trainfleet.cli.market import leaderboard_table

HOSTILE = "\x1b[31mred[/][bold]x"


def test_a_competition_name_in_the_leaderboard_title_is_plain_text() -> None:
    console = Console(record=True, width=200, color_system=None)
    console.print(leaderboard_table({"competition": {"name": HOSTILE}, "entries": []}))
    out = console.export_text()
    assert "\x1b" not in out
    assert "leaderboard \\x1b[31mred[/][bold]x" in out
