"""Fair share: order the jobs of one priority by their submitters' recent use, least first.

The model is Slurm's multifactor fair-share factor with ``PriorityDecayHalfLife``:

- usage: each submitter's decayed job-hours U_s (one worker slot for one hour = 1); use at
  time t counts ``2^-((now - t) / H)`` at ``now``, H the half-life (``[fair_share]
  half_life_h``, default 168 h). An attempt is charged at its end (complete, fail, lost, and
  the operator's cancel, requeue or revoke: ``charge_ended``) for its time since
  ``max(claimed_at, charged_at)``, and by the leader's tick for every running attempt's time
  since then (then ``charged_at = now``; never moved back by a clock stepping back, nor is a
  usage row's time, so no span is charged twice). A charge of the interval [a, b] is
  the exact integral of the decay over it (``interval_hours``), so charging a long attempt
  in pieces, tick by tick, adds up to charging it once at its end.
- factor: ``F_s = 2^-(u_s / s_s)`` with ``u_s = U_s / sum(U)`` (0 when nobody used anything)
  and ``s_s = share_s / sum(shares)`` over the submitters with jobs or usage; shares are 1
  each unless ``[fair_share.shares]`` weighs them. F = 1 for no use, 0.5 for use exactly in
  proportion to the share, towards 0 above it.
- level: ``round(10 * (1 - F))``, 0..10, kept in ``jobs.fair`` of every pending or waiting job
  of the submitter. The claim orders by ``priority DESC, fair, seq``: priority stays strict,
  fair share orders work *within* one priority, then FIFO.

Usage is kept as of a time (``fair_usage.usage_h`` at ``fair_usage.at``) and decayed in
Python (SQLite has no ``pow``): ``charge`` is a read-modify-write inside the caller's write
transaction. Each SQL function here runs on a connection the caller has already put inside
a write transaction (``tick``, ``charge``) or on a read connection (``report``, ``note``).

New jobs are inserted with ``fair = 0`` by whoever inserts them (a reload, ``submit``, a
requeue, a changed submitter on reload): the tick sets every pending or waiting row whose
level differs from its submitter's, through the ``jobs_by_submitter`` index, so no insert
path has to know about fair share and none can leave a stale level behind for longer than
one tick (``interval_s``, default 5 s). An attempt that fails back to pending takes its
submitter's level at once (``sqlite_attempts``: the charge has read it anyway).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from trainfleet.manifest.spec import FairShareSpec
from trainfleet.queue.db import Conn, Dialect, Row

META_KEY = "fair_share"  # the ``meta`` row holding the applied ``[fair_share]`` as JSON
LEVELS = 10  # levels are 0..LEVELS
NEGLIGIBLE_H = 1e-6  # decayed below this (3.6 ms of use) and with no job: forgotten
_LN2 = math.log(2.0)
_OPEN = ("pending", "waiting", "claimed", "running")


# -- the math (pure) ------------------------------------------------------------------------
def decay(usage_h: float, elapsed_s: float, half_life_h: float) -> float:
    """``usage_h`` counted ``elapsed_s`` later: halved every ``half_life_h`` hours. A clock
    that stepped back (negative elapsed) does not grow it."""
    return usage_h * 2.0 ** (-max(elapsed_s, 0.0) / 3600.0 / half_life_h)


def interval_hours(start: float, end: float, half_life_h: float) -> float:
    """Job-hours of one slot busy from ``start`` to ``end`` (epoch seconds), counted at
    ``end``: the integral of ``2^-((end - t) / H)`` over the interval, in hours. Additive
    under decay: charging [a, m] at m, decayed to b, plus [m, b] at b equals [a, b] at b."""
    hours = max(end - start, 0.0) / 3600.0
    return -math.expm1(-hours / half_life_h * _LN2) * half_life_h / _LN2


def normalized(usages: Mapping[str, float]) -> dict[str, float]:
    """Each submitter's fraction of the total use; all 0 when nobody used anything."""
    total = sum(usages.values())
    return {s: (u / total if total > 0 else 0.0) for s, u in usages.items()}


def share_fractions(submitters: Iterable[str], weights: Mapping[str, float]) -> dict[str, float]:
    """Each submitter's share of the fleet: its weight (default 1) over the weights of all.
    The weights are scaled by the largest first, so weights near the float limits (1e308,
    5e-324) neither overflow the sum nor divide by it into nonsense."""
    ws = {s: weights.get(s, 1.0) for s in submitters}
    top = max(ws.values(), default=1.0)
    scaled = {s: w / top for s, w in ws.items()}
    total = sum(scaled.values())
    return {s: w / total for s, w in scaled.items()}


def factor(usage: float, share: float) -> float:
    """Slurm's fair-share factor ``2^-(usage / share)``: 1 for no use, 0.5 at its share. A
    share too small to represent (0) makes any use the most (0) and no use still 1."""
    if share <= 0.0:
        return 1.0 if usage <= 0.0 else 0.0
    return 2.0 ** (-usage / share)


def _hours(h: float) -> str:
    """Job-hours for a message: one decimal, but a few minutes of use are not "0.0"."""
    return f"{h:.1f}" if h == 0 or abs(h) >= 0.1 else f"{h:.2g}"


def level(f: float) -> int:
    """``round(10 * (1 - F))``, halves rounded up: 0 (least use) .. 10."""
    return min(LEVELS, max(0, math.floor(LEVELS * (1.0 - f) + 0.5)))


# -- records ---------------------------------------------------------------------------------
class Standing(BaseModel):
    """One submitter's fair-share standing now."""

    model_config = ConfigDict(frozen=True)

    submitter: str
    usage_h: float = Field(description="decayed job-hours used (one slot for one hour = 1)")
    usage: float = Field(description="fraction of the fleet's decayed use, 0..1")
    share: float = Field(description="fraction of the fleet it is entitled to, 0..1")
    factor: float = Field(description="2^-(usage/share): 1 for no use, 0.5 at its share")
    level: int = Field(description="round(10 * (1 - factor)); lower levels are claimed first")
    pending: int = Field(description="its jobs in state pending")
    waiting: int = Field(description="its jobs waiting for their parents")
    running: int = Field(description="its jobs claimed or running")


class FairShareReport(BaseModel):
    """``GET /v1/fair-share``: the settings and every submitter with jobs or usage."""

    model_config = ConfigDict(frozen=True)

    half_life_h: float
    interval_s: float
    at: float = Field(description="the time the usage is decayed to")
    submitters: list[Standing]


@dataclass
class FairShareState:
    """What one tick did: the levels now, which changed, the rows rewritten."""

    at: float
    interval_s: float
    levels: dict[str, int] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    rewritten: int = 0
    charged_h: float = 0.0


# -- the settings ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _parse(text: str) -> FairShareSpec:
    return FairShareSpec.model_validate_json(text)


def settings(conn: Conn) -> FairShareSpec:
    """The ``[fair_share]`` of the last applied manifest (defaults before the first)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (META_KEY,)).fetchone()
    return _parse(row["value"]) if row else FairShareSpec()


# -- charging --------------------------------------------------------------------------------
def charged_from(row: Row, now: float) -> float:
    """Where an active attempt's uncharged time starts: its claim, or the last fair-share
    tick that charged it (``row``: a ``jobs`` row's ``claimed_at`` and ``charged_at``)."""
    return max(row["claimed_at"] or now, row["charged_at"] or 0.0)


def charge_ended(conn: Conn, row: Row, now: float) -> None:
    """Charge the attempt of a job row that the operator ends while it is claimed or running
    (cancel, requeue, revoke) for its time since the last charge; other rows charge nothing.
    ``row`` needs ``state``, ``submitter``, ``claimed_at`` and ``charged_at``."""
    if row["state"] in ("claimed", "running"):
        charge_spans(conn, row["submitter"], [(charged_from(row, now), now)])


# One statement reads the settings and the submitter's usage row (either may be missing).
_CHARGE_READ = (
    "SELECT m.value AS config, u.usage_h, u.at, u.level FROM (SELECT 1 AS one) AS o"
    " LEFT JOIN meta m ON m.key = ? LEFT JOIN fair_usage u ON u.submitter = ?"
)
# A usage row's time never goes back (a clock stepped back does not decay it twice).
_LATER_AT = "CASE WHEN excluded.at > fair_usage.at THEN excluded.at ELSE fair_usage.at END"
_UPSERT = (
    "INSERT INTO fair_usage (submitter, usage_h, at, level) VALUES (?, ?, ?, ?)"
    f" ON CONFLICT (submitter) DO UPDATE SET usage_h = excluded.usage_h, at = {_LATER_AT}"
)
# The same sum with the stored usage decayed in the statement, on the row as it stands when
# the statement gets its row lock (``decay``'s arithmetic, in its order): for PostgreSQL, where
# completions charge side by side under the shared write lock and a read-then-write would
# lose one of two charges made at once. PostgreSQL raises an error where a float result
# underflows to 0 (Python returns 0): past 960 half-lives the decayed usage (below 1e-289 of
# itself, nothing against any charge) is taken as 0.
_EXPONENT = (
    "-(CASE WHEN excluded.at > fair_usage.at THEN excluded.at - fair_usage.at ELSE 0.0 END)"
    " / 3600.0 / ?"
)
_ADD_DECAYED = (
    "INSERT INTO fair_usage (submitter, usage_h, at, level) VALUES (?, ?, ?, 0)"
    f" ON CONFLICT (submitter) DO UPDATE SET usage_h = CASE WHEN {_EXPONENT} < -960 THEN 0.0"
    f" ELSE fair_usage.usage_h * power(CAST(2.0 AS DOUBLE PRECISION), {_EXPONENT}) END"
    f" + excluded.usage_h, at = {_LATER_AT}"
)


def charge_spans(conn: Conn, submitter: str, spans: Iterable[tuple[float, float]]) -> int:
    """Charge ``submitter`` for slot time over each ``(start, end)`` (the end is when it is
    charged); two statements for any number of spans. Returns its stored level.

    On PostgreSQL the write adds to the row in one statement (``_ADD_DECAYED``): charges may
    run side by side there. SQLite's writes are serialized, and its ``power`` is optional."""
    row = conn.execute(_CHARGE_READ, (META_KEY, submitter)).fetchone()
    spec = _parse(row["config"]) if row["config"] else FairShareSpec()
    spans, h = list(spans), spec.half_life_h
    now = max(end for _, end in spans)
    hours = sum(decay(interval_hours(a, b, h), now - b, h) for a, b in spans)
    if conn.dialect == Dialect.POSTGRES:
        conn.execute(_ADD_DECAYED, (submitter, hours, now, h, h))
    else:
        _write(conn, submitter, row["usage_h"], row["at"], hours, now, h)
    return int(row["level"] or 0)


def charge(conn: Conn, submitter: str, hours: float, now: float, half_life_h: float) -> None:
    """Add ``hours`` of use at ``now`` to ``submitter``'s decayed usage."""
    row = conn.execute(
        "SELECT usage_h, at FROM fair_usage WHERE submitter = ?", (submitter,)
    ).fetchone()
    _write(conn, submitter, row and row["usage_h"], row and row["at"], hours, now, half_life_h)


def _write(
    conn: Conn,
    submitter: str,
    usage_h: float | None,
    at: float | None,
    hours: float,
    now: float,
    half_life_h: float,
) -> None:
    before = decay(usage_h, now - at, half_life_h) if usage_h is not None and at is not None else 0
    conn.execute(_UPSERT, (submitter, before + hours, max(now, at or now), 0))


# -- the tick and the report -----------------------------------------------------------------
def _standings(
    conn: Conn, now: float, spec: FairShareSpec
) -> tuple[dict[str, Standing], dict[str, float], dict[str, tuple[float, int]]]:
    """Every submitter's standing at ``now`` with running attempts' uncharged time counted;
    also that uncharged time by submitter, and the stored ``(usage_h at now, level)`` rows."""
    h = spec.half_life_h
    uncharged: dict[str, float] = defaultdict(float)
    for r in conn.execute(
        "SELECT submitter, claimed_at, charged_at FROM jobs WHERE state IN ('claimed', 'running')"
    ):
        uncharged[r["submitter"]] += interval_hours(charged_from(r, now), now, h)
    stored = {
        r["submitter"]: (decay(r["usage_h"], now - r["at"], h), int(r["level"]))
        for r in conn.execute("SELECT submitter, usage_h, at, level FROM fair_usage")
    }
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(_OPEN, 0))
    for r in conn.execute(
        "SELECT submitter, state, COUNT(*) AS n FROM jobs"
        " WHERE state IN ('pending', 'waiting', 'claimed', 'running') GROUP BY submitter, state"
    ):
        counts[r["submitter"]][r["state"]] = int(r["n"])
    usages = {s: u for s, (u, _) in stored.items() if u >= NEGLIGIBLE_H or s in counts}
    for s in counts:
        usages.setdefault(s, 0.0)
    for s, hours in uncharged.items():
        usages[s] = usages.get(s, 0.0) + hours
    shares = share_fractions(usages, spec.shares)
    fractions = normalized(usages)
    out = {}
    for s in sorted(usages):
        f = factor(fractions[s], shares[s])
        c = counts.get(s) or dict.fromkeys(_OPEN, 0)
        out[s] = Standing(
            submitter=s,
            usage_h=usages[s],
            usage=fractions[s],
            share=shares[s],
            factor=f,
            level=level(f),
            pending=c["pending"],
            waiting=c["waiting"],
            running=c["claimed"] + c["running"],
        )
    return out, uncharged, stored


def tick(conn: Conn, now: float) -> FairShareState:
    """Charge running attempts up to ``now``, recompute every level, and rewrite ``jobs.fair``
    of the pending and waiting rows whose level differs from their submitter's."""
    spec = settings(conn)
    standings, uncharged, stored = _standings(conn, now, spec)
    # Never back: after a clock step back, the time up to the old mark is charged already.
    conn.execute(
        "UPDATE jobs SET charged_at = ? WHERE state IN ('claimed', 'running')"
        " AND (charged_at IS NULL OR charged_at < ?)",
        (now, now),
    )
    state = FairShareState(at=now, interval_s=spec.interval_s)
    for s in stored:
        if s not in standings:  # negligible use and no job: forgotten
            conn.execute("DELETE FROM fair_usage WHERE submitter = ?", (s,))
    for s, st in standings.items():
        state.levels[s] = st.level
        old_level = stored[s][1] if s in stored else 0
        if s in uncharged or st.level != old_level:
            conn.execute(
                "INSERT INTO fair_usage (submitter, usage_h, at, level) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (submitter) DO UPDATE SET usage_h = excluded.usage_h,"
                f" at = {_LATER_AT}, level = excluded.level",
                (s, st.usage_h, now, st.level),
            )
        if st.level != old_level:
            state.changed.append(s)
        if st.pending or st.waiting:
            state.rewritten += conn.execute(
                "UPDATE jobs SET fair = ? WHERE submitter = ?"
                " AND state IN ('pending', 'waiting') AND fair <> ?",
                (st.level, s, st.level),
            ).rowcount
    state.charged_h = sum(uncharged.values(), 0.0)
    return state


def report(conn: Conn, now: float) -> FairShareReport:
    """Every submitter with jobs or usage, its usage decayed to ``now`` (running attempts'
    time included), share, factor and level."""
    spec = settings(conn)
    standings, _, _ = _standings(conn, now, spec)
    return FairShareReport(
        half_life_h=spec.half_life_h,
        interval_s=spec.interval_s,
        at=now,
        submitters=list(standings.values()),
    )


def note(conn: Conn, submitter: str, priority: int, now: float) -> str:
    """The explain line of a pending or waiting job of ``submitter`` at ``priority``."""
    st = report(conn, now).submitters
    mine = next((s for s in st if s.submitter == submitter), None)
    if mine is None:  # no job and no use: cannot happen for a job's own submitter
        return f"fair share: submitter {submitter} has no recent use: level 0 of {LEVELS}"
    order = (
        f"jobs of levels below {mine.level} go first"
        if mine.level
        else "no job goes before it on fair share (level 0 is the lowest)"
    )
    return (
        f"fair share: submitter {submitter} used {_hours(mine.usage_h)} job-hours recently"
        f" ({mine.usage:.0%} of the fleet's use, share {mine.share:.0%}): factor"
        f" {mine.factor:.2f}, level {mine.level} of {LEVELS}; at priority {priority}, {order}"
    )
