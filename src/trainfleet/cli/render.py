"""Rich tables for the CLI. Pure functions of API JSON, so ``--json`` and tables agree."""

from __future__ import annotations

import time
from typing import Any

from rich.table import Table

STATE_STYLE = {
    "pending": "yellow",
    "claimed": "cyan",
    "running": "cyan",
    "completed": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def _fmt(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def state(s: str) -> str:
    return f"[{STATE_STYLE.get(s, 'white')}]{s}[/]"


def jobs_table(jobs: list[dict[str, Any]], title: str = "jobs") -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("id", "job", "state", "host", "attempts", "held-out loss", "tokens/s", "artifact"):
        table.add_column(
            col, justify="right" if col in ("attempts", "held-out loss", "tokens/s") else "left"
        )
    for job in jobs:
        result = job.get("result") or {}
        metrics = result.get("metrics") or {}
        table.add_row(
            job["id"][:12],
            job["name"] + ("" if job.get("in_manifest", True) else " [dim](removed)[/]"),
            state(job["state"]),
            job.get("host") or "-",
            str(job["attempt"]),
            _fmt(metrics.get("heldout_loss")),
            _fmt(metrics.get("tokens_per_s"), ",.0f"),
            (result.get("artifact") or "-")[:12],
        )
    return table


def workers_table(workers: list[dict[str, Any]]) -> Table:
    table = Table(title="workers", title_justify="left")
    for col in ("worker", "host", "state", "cores", "RAM GiB", "CUDA", "job", "seen", "notes"):
        table.add_column(col)
    now = time.time()
    for w in workers:
        eff = w["effective"]
        cuda = f"{eff['num_gpus']}x {eff['vram_gib']:g} GiB" if eff["cuda"] else "no"
        table.add_row(
            w["id"],
            w["host"],
            w["state"],
            str(eff["cores"]),
            f"{eff['ram_gib']:.1f}",
            cuda,
            (w.get("current_job") or "-")[:12],
            f"{now - w['last_seen']:.0f}s ago",
            "; ".join(w.get("notes") or []),
        )
    return table


def plan_table(plan: dict[str, Any]) -> Table:
    verb = "applied" if plan["applied"] else "dry run: nothing changed"
    table = Table(
        title=f"reload plan ({verb}); manifest {plan['manifest_hash'][:12]}", title_justify="left"
    )
    for col in ("change", "id", "job", "state", "details"):
        table.add_column(col)
    styles = {"added": "green", "changed": "yellow", "removed": "red", "kept": "dim"}
    for kind in ("added", "changed", "removed", "kept"):
        for entry in plan[kind]:
            details = ", ".join(
                f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in entry.get("changes", {}).items()
            )
            if kind == "removed":
                details = "stays until cancelled"
            table.add_row(
                f"[{styles[kind]}]{kind}[/]",
                entry["id"][:12],
                entry["name"],
                entry.get("state") or "-",
                details,
            )
    return table


def events_table(events: list[dict[str, Any]]) -> Table:
    table = Table(title="events", title_justify="left")
    for col in ("time", "event", "transition", "worker", "epoch", "detail"):
        table.add_column(col)
    for e in events:
        transition = f"{e['from_state'] or ''} -> {e['to_state']}" if e["to_state"] else ""
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(e["at"])),
            e["kind"],
            transition,
            e.get("worker_id") or "",
            str(e["epoch"] or ""),
            e["detail"],
        )
    return table


def artifacts_table(artifacts: list[dict[str, Any]]) -> Table:
    table = Table(title="artifacts", title_justify="left")
    for col in ("sha256", "name", "bytes", "attempt", "epoch", "worker", "host", "manifest"):
        table.add_column(col)
    for a in artifacts:
        table.add_row(
            a["sha256"][:16],
            a["name"],
            f"{a['size']:,}",
            str(a["attempt"]),
            str(a["epoch"]),
            a["worker_id"],
            a["capability"]["host"],
            a["manifest_hash"][:12],
        )
    return table
