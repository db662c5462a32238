"""The plan of a reload for specs stored by identity: ``[[runs]]`` and ``[[pipelines]]``.

A run's or a pipeline's id is the sha256 of its canonical identity, so a reload's plan is a
set difference, the same for both: a new id is *added* (or, when a live one of the same name
exists, that one is *superseded* and the new one is *changed*, ``changes.id = [old, new]``);
an id in both is *kept*, or *changed* when a scheduling field differs (the changes name
them); a stored id gone from the manifest is *removed*. What each of those does to the rows
is the table's own (``SpecTable``'s callbacks: ``sqlite_runs_reload``,
``sqlite_pipelines_reload``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from trainfleet.queue.base import PlanEntry
from trainfleet.queue.db import Conn, Row

S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True)
class SpecTable(Generic[S]):
    """How one kind of spec is stored: its table, and what each plan entry writes."""

    table: str  # its rows have id, seq, name, spec (JSON), state, in_manifest
    model: type[S]
    identity: frozenset[str]  # fields that make a new id (never listed as changes)
    live_states: tuple[str, ...]  # a row in one of these is superseded by a new identity
    spec_id: Callable[[S], str]
    insert: Callable[[Conn, S, str, float], None]  # (conn, spec, id, now)
    update: Callable[[Conn, Row, S, float], None]  # (conn, old row, spec, now)
    supersede: Callable[[Conn, Row, str, float], None]  # (conn, old row, new id, now)
    remove: Callable[[Conn, Row, float], None]  # (conn, row, now): gone from the manifest
    list_superseded: bool = False  # also list the old row as "superseded"


def plan_specs(
    conn: Conn, specs: Sequence[S], kind: SpecTable[S], now: float, *, dry_run: bool
) -> list[PlanEntry]:
    """Plan (and unless ``dry_run``, write) one table's part of a reload."""
    stored = {r["id"]: r for r in conn.execute(f"SELECT * FROM {kind.table} ORDER BY seq")}
    entries: list[PlanEntry] = []
    handled: set[str] = set()
    for spec in specs:
        sid = kind.spec_id(spec)
        name: str = getattr(spec, "name")  # noqa: B009 - every stored spec has a name
        handled.add(sid)
        old = stored.get(sid)
        if old is None:
            entries += _add(conn, spec, sid, name, stored, handled, kind, now, dry_run=dry_run)
            continue
        delta = _changes(kind, old, spec)
        state = "changed" if delta else "kept"
        entries.append(PlanEntry(id=sid, name=name, state=state, changes=delta))
        if delta and not dry_run:
            kind.update(conn, old, spec, now)
    for r in stored.values():
        if r["id"] in handled or not r["in_manifest"]:
            continue
        entries.append(PlanEntry(id=r["id"], name=r["name"], state="removed"))
        if not dry_run:
            kind.remove(conn, r, now)
    return entries


def _changes(kind: SpecTable[S], old: Row, spec: S) -> dict[str, Any]:
    before = kind.model.model_validate_json(old["spec"]).model_dump(mode="json")
    after = spec.model_dump(mode="json")
    delta: dict[str, Any] = {
        k: [before.get(k), v]
        for k, v in after.items()
        if k not in kind.identity and before.get(k) != v
    }
    if not old["in_manifest"]:
        delta["in_manifest"] = [False, True]
    return delta


def _add(
    conn: Conn,
    spec: S,
    sid: str,
    name: str,
    stored: dict[str, Row],
    handled: set[str],
    kind: SpecTable[S],
    now: float,
    *,
    dry_run: bool,
) -> list[PlanEntry]:
    """A new identity: added, or replacing (superseding) the live ones of the same name."""
    entries: list[PlanEntry] = []
    for r in stored.values():
        if r["name"] != name or r["state"] not in kind.live_states:
            continue
        handled.add(r["id"])
        entries.append(
            PlanEntry(id=sid, name=name, state="changed", changes={"id": [r["id"], sid]})
        )
        if kind.list_superseded:
            entries.append(PlanEntry(id=r["id"], name=r["name"], state="superseded"))
        if not dry_run:
            kind.supersede(conn, r, sid, now)
    if not entries:
        entries.append(PlanEntry(id=sid, name=name, state="added"))
    if not dry_run:
        kind.insert(conn, spec, sid, now)
    return entries


__all__ = ["SpecTable", "plan_specs"]
