r"""Rich tables for the CLI. Pure functions of API JSON, so ``--json`` and tables agree.

Every string in API JSON may have come from a worker or a job (names, hosts, errors, log
lines, metrics, event details, notes), so it is shown as plain text: it goes into a table or
a line as a ``rich.text.Text`` (no markup or emoji codes interpreted, so ``[red]`` prints as
is and ``[/]`` cannot crash a table), and :func:`clean` first makes every terminal control
character visible (ESC, CSI, OSC 8 hyperlinks, ``\r``, backspace, the other C0/C1 controls
and DEL, bidirectional overrides, lone surrogates) as a ``\xNN``/``\uNNNN`` escape. Only
``\n`` and ``\t`` pass. ``trainfleet logs --raw`` is the one way to get a job's bytes as-is.
"""

from __future__ import annotations

import re
import time
from typing import Any

from rich.table import Table
from rich.text import Text

STATE_STYLE = {
    "waiting": "blue",
    "pending": "yellow",
    "claimed": "cyan",
    "running": "cyan",
    "completed": "green",
    "failed": "red",
    "cancelled": "magenta",
}

# C0 controls but \t and \n, DEL, C1 controls, bidi embeddings/overrides/isolates, and
# lone surrogates (which JSON can carry and no terminal encoding can print).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: Any) -> str:
    """``value`` as text with every terminal control sequence neutralized (made visible)."""
    text = value if isinstance(value, str) else str(value)
    return _UNSAFE.sub(_escape_char, text)


def plain(value: Any, style: str = "") -> Text:
    """``value`` as a cleaned ``Text``: printed literally, never parsed as markup."""
    return Text(clean(value), style=style)


def clean_data(value: Any) -> Any:
    """A JSON value with every string in it (keys too) cleaned."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(k): clean_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_data(v) for v in value]
    return value


def _fmt(value: Any, spec: str = ".4f") -> str:
    """A number as ``spec`` says; "-" for anything else (a worker may report any JSON)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    try:
        return format(value, spec)
    except (OverflowError, ValueError):  # e.g. 10**400 cannot become a float
        return "-"


def _object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def state(s: Any) -> Text:
    return plain(s, STATE_STYLE.get(s, "white") if isinstance(s, str) else "white")


def _short(value: Any, n: int) -> Text:
    return plain(value[:n] if isinstance(value, str) else (value or "-"))


def jobs_table(jobs: list[dict[str, Any]], title: str = "jobs") -> Table:
    table = Table(title=plain(title), title_justify="left")
    for col in ("id", "job", "state", "host", "attempts", "held-out loss", "tokens/s", "artifact"):
        table.add_column(
            col, justify="right" if col in ("attempts", "held-out loss", "tokens/s") else "left"
        )
    for job in jobs:
        result = _object(job.get("result"))
        metrics = _object(result.get("metrics"))
        name = plain(job["name"])
        if job.get("submitted"):
            name.append(" (submitted)", style="dim")
        elif not job.get("in_manifest", True):
            name.append(" (removed)", style="dim")
        table.add_row(
            _short(job["id"], 12),
            name,
            state(job["state"]),
            plain(job.get("host") or "-"),
            plain(job["attempt"]),
            _fmt(metrics.get("heldout_loss")),
            _fmt(metrics.get("tokens_per_s"), ",.0f"),
            _short(result.get("artifact") or "-", 12),
        )
    return table


def workers_table(workers: list[dict[str, Any]]) -> Table:
    table = Table(title="workers", title_justify="left")
    for col in ("worker", "host", "state", "cores", "RAM GiB", "CUDA", "job", "seen", "notes"):
        table.add_column(col)
    now = time.time()
    for w in workers:
        eff = w["effective"]
        cuda = f"{eff['num_gpus']}x {_fmt(eff['vram_gib'], 'g')} GiB" if eff["cuda"] else "no"
        table.add_row(
            plain(w["id"]),
            plain(w["host"]),
            state(w["state"]),
            plain(eff["cores"]),
            _fmt(eff["ram_gib"], ".1f"),
            plain(cuda),
            _short(w.get("current_job") or "-", 12),
            f"{now - w['last_seen']:.0f}s ago" if isinstance(w["last_seen"], int | float) else "-",
            plain("; ".join(map(str, w.get("notes") or []))),
        )
    return table


def hosts_table(hosts: list[dict[str, Any]]) -> Table:
    table = Table(title="hosts", title_justify="left")
    for col in ("host", "state", "enrolled", "token issued", "workers online"):
        table.add_column(col)
    for h in hosts:
        table.add_row(
            plain(h["name"]),
            plain(h["state"]),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(h["enrolled_at"])),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(h["rotated_at"])),
            plain(h["workers_online"]),
        )
    return table


def plan_table(plan: dict[str, Any]) -> Table:
    verb = "applied" if plan["applied"] else "dry run: nothing changed"
    table = Table(
        title=plain(f"reload plan ({verb}); manifest {plan['manifest_hash'][:12]}"),
        title_justify="left",
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
                pending = entry.get("state") in ("pending", "waiting")
                details = "not claimable unless requeued" if pending else "stays, in its state"
            table.add_row(
                Text(kind, style=styles[kind]),
                _short(entry["id"], 12),
                plain(entry["name"]),
                plain(entry.get("state") or "-"),
                plain(details),
            )
    for entry in plan.get("runs", []):
        kind = entry.get("state") or "kept"
        details = ", ".join(
            f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in entry.get("changes", {}).items()
        )
        if kind == "removed":
            details = "paused: no new round opens until a reload adds it back"
        table.add_row(
            Text(f"run {kind}", style=styles.get(kind, "")),
            _short(entry["id"], 12),
            plain(entry["name"]),
            plain("-"),
            plain(details),
        )
    return table


def plan_summary(plan: dict[str, Any]) -> str:
    """'7 added, 0 changed, 0 kept, 0 removed; runs: 1 added' (runs only when there are any)."""
    text = ", ".join(f"{len(plan[k])} {k}" for k in ("added", "changed", "kept", "removed"))
    runs = plan.get("runs") or []
    if runs:
        counts: dict[str, int] = {}
        for entry in runs:
            counts[entry.get("state") or "kept"] = counts.get(entry.get("state") or "kept", 0) + 1
        text += "; runs: " + ", ".join(f"{n} {state}" for state, n in counts.items())
    return text


def events_table(events: list[dict[str, Any]]) -> Table:
    table = Table(title="events", title_justify="left")
    for col in ("time", "event", "transition", "worker", "epoch", "detail"):
        table.add_column(col)
    for e in events:
        transition = f"{e['from_state'] or ''} -> {e['to_state']}" if e["to_state"] else ""
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(e["at"])),
            plain(e["kind"]),
            plain(transition),
            plain(e.get("worker_id") or ""),
            plain(e["epoch"] or ""),
            plain(e["detail"]),
        )
    return table


def artifacts_table(artifacts: list[dict[str, Any]]) -> Table:
    table = Table(title="artifacts", title_justify="left")
    for col in ("sha256", "name", "bytes", "attempt", "epoch", "worker", "host", "manifest"):
        table.add_column(col)
    for a in artifacts:
        table.add_row(
            _short(a["sha256"], 16),
            plain(a["name"]),
            _fmt(a["size"], ","),
            plain(a["attempt"]),
            plain(a["epoch"]),
            plain(a["worker_id"]),
            plain(a["capability"]["host"]),
            _short(a["manifest_hash"], 12),
        )
    return table
