"""Job dependencies on the SQL queue: release or fail waiting jobs, and the checks that keep
the graph of ``after`` names free of cycles across a reload and a submit.

A job with ``after`` starts 'waiting' (``sqlite_operator.initial_state``); claims never see
it (they select 'pending'). The leader's dependency step (``resolve``, every ~0.5 s from the
coordinator's lifespan) looks at each waiting job still in the manifest, pinned or submitted:

- every parent 'completed' -> 'pending' (event "released": "job-a, job-b completed");
- a parent 'failed' or 'cancelled' -> 'failed' ("parent job-a failed: <its error>", the
  error cut to ``MAX_REASON_CHARS`` so reasons do not grow down a chain);
- a parent name no job answers to -> 'failed' ("parent job-a does not exist").

A parent name means the newest job of that name (max seq) in the manifest or submitted
(``in_manifest = 1 OR origin = 'submit'``): an edited job's new version, never a removed
one. A failed child is itself a parent: ``plan_moves`` carries a failure down to the jobs
waiting for it in the same plan, so a whole chain fails in one transaction, with one read
of the waiting jobs however deep it is. A waiting job a reload removed is left alone (not
claimable, like a removed pending job) until a reload adds it back.

The functions take a ``db.Conn`` like the other ``sqlite_*`` modules; ``plan_moves`` only
reads, so the caller can look first without the write lock and write only when some job
moves (the step runs every half second; most find nothing). Reading every waiting job costs
about 0.1 s at 10,000 of them, so ``Watch`` skips the look while the event log says nothing
that could move one happened since the last (only claims and starts, or nothing at all),
and looks anyway every ``FULL_LOOK_S``: a change that writes no event (a reload editing a
waiting job's ``after``), or an event that commits on PostgreSQL after a later one was
seen, waits at most that long.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from trainfleet.errors import BadRequest
from trainfleet.manifest.deps import cycle_text, find_cycle
from trainfleet.manifest.identity import job_id
from trainfleet.manifest.spec import Manifest
from trainfleet.queue import db
from trainfleet.queue.fleet_cache import SPECS
from trainfleet.queue.sqlite_schema import insert_event

# The jobs a name may resolve to: in the manifest, or submitted (never a removed version).
CURRENT = "(in_manifest = 1 OR origin = 'submit')"
# The waiting jobs the step resolves: a removed one waits, unclaimable, like a removed pending.
RESOLVED = "(in_manifest = 1 OR pinned = 1 OR origin = 'submit')"
ENDED_BADLY = ("failed", "cancelled")
FULL_LOOK_S = 5.0  # the longest the step skips looking at the waiting jobs
# Events that cannot move a waiting job: a claim, a start, a note about a log, and this
# step's own moves (``apply_moves``: a failure already carried down to the jobs after it).
_QUIET_EVENT = (
    "(COALESCE(to_state, '') IN ('claimed', 'running') OR kind IN ('log_truncated', 'released')"
    " OR (kind = 'failed' AND from_state = 'waiting'))"
)
MAX_REASON_CHARS = 1000  # of a parent's error quoted in its child's


@dataclass(frozen=True)
class Parent:
    name: str
    state: str | None  # None: no job of that name
    error: str | None = None
    job_id: str | None = None


@dataclass(frozen=True)
class Move:
    job_id: str
    to_state: str  # 'pending' or 'failed'
    detail: str  # the released event's detail, or the failed job's error


@dataclass(frozen=True)
class Waiting:
    job_id: str
    name: str
    after: list[str]


def parents(conn: db.Conn, names: Iterable[str]) -> dict[str, Parent]:
    """Each name's current job (the newest of that name in the manifest or submitted); a
    name without one is absent."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    marks = ", ".join("?" for _ in wanted)
    rows = conn.execute(
        f"SELECT id, name, state, error, seq FROM jobs WHERE name IN ({marks}) AND {CURRENT}"
        " ORDER BY seq",
        tuple(wanted),
    ).fetchall()
    return {  # newest wins
        r["name"]: Parent(r["name"], r["state"], r["error"], r["id"]) for r in rows
    }


def reason(error: str | None) -> str:
    """A parent's error as its child quotes it, cut to ``MAX_REASON_CHARS``: down a chain
    each child quotes the one before, and the reasons must not grow with its depth."""
    text = error or "no reason"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def decide(after: list[str], found: dict[str, Parent]) -> tuple[str, str] | None:
    """What happens to a waiting job with these parents now: ``(to_state, detail)``, or None
    while it still waits. A missing or failed parent decides before one still running."""
    for name in after:
        parent = found.get(name)
        if parent is None:
            return "failed", f"parent {name} does not exist"
        if parent.state in ENDED_BADLY:
            return "failed", f"parent {name} {parent.state}: {reason(parent.error)}"
    if not after:  # a reload took its ``after`` away
        return "pending", "no parents left"
    if all(found[name].state == "completed" for name in after):
        return "pending", ", ".join(after) + " completed"
    return None


def newest_seq(conn: db.Conn) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])


class Watch:
    """Whether the dependency step needs to look at the waiting jobs now (one per queue)."""

    def __init__(self) -> None:
        self.seen = -1  # the newest event seq at the last ``due``
        self.looked_at: float | None = None  # when the last full look was allowed

    def due(self, conn: db.Conn, now: float, top: int | None = None) -> bool:
        """True when an event since the last call could move a waiting job (a job ended,
        was added, requeued, cancelled...), or ``FULL_LOOK_S`` passed since the last look.
        Two reads of the events' primary key, over the new events only. ``top``: the newest
        seq, read by the caller where reading it takes a lock (``newest_seq``)."""
        if top is None:
            top = newest_seq(conn)
        seen, self.seen = self.seen, top
        last = self.looked_at
        if seen < 0 or last is None or not 0 <= now - last < FULL_LOOK_S:
            self.looked_at = now
            return True
        if top == seen:
            return False
        stirred = conn.execute(
            f"SELECT 1 FROM events WHERE seq > ? AND seq <= ? AND NOT {_QUIET_EVENT} LIMIT 1",
            (seen, top),
        ).fetchone()
        return stirred is not None


def waiting_rows(conn: db.Conn) -> list[Waiting]:
    """The waiting jobs the step resolves, in queue order."""
    rows = conn.execute(
        f"SELECT id, name, spec FROM jobs WHERE state = 'waiting' AND {RESOLVED} ORDER BY seq"
    ).fetchall()
    return [Waiting(r["id"], r["name"], SPECS.get(r["id"], r["spec"]).after) for r in rows]


def plan_moves(conn: db.Conn) -> list[Move]:
    """The waiting jobs that move now (reads only), a failure carried down to the jobs
    waiting for the failed one in the same plan: one read of the waiting jobs and one of
    their parents, then O(jobs + edges) however deep the chain (the leader runs this every
    half second, in the write lock when something moves)."""
    waits = waiting_rows(conn)
    if not waits:
        return []
    found = parents(conn, (name for w in waits for name in w.after))
    children: dict[str, list[Waiting]] = defaultdict(list)
    for w in waits:
        for name in w.after:
            children[name].append(w)
    moves: list[Move] = []
    moved: set[str] = set()
    todo = deque(waits)
    while todo:
        w = todo.popleft()
        decided = None if w.job_id in moved else decide(w.after, found)
        if decided is None:
            continue
        moved.add(w.job_id)
        moves.append(Move(w.job_id, *decided))
        current = found.get(w.name)
        if decided[0] == "failed" and current is not None and current.job_id == w.job_id:
            found[w.name] = Parent(w.name, "failed", decided[1], w.job_id)
            todo.extend(children[w.name])  # its own children fail in this plan too
    return moves


def apply_moves(conn: db.Conn, moves: list[Move], clock: Callable[[], float]) -> int:
    """Write ``moves`` (each only if its job is still waiting); the number written."""
    now = clock()
    moved = 0
    for move in moves:
        if move.to_state == "pending":
            cur = conn.execute(
                "UPDATE jobs SET state = 'pending', pending_since = ?, updated_at = ?"
                " WHERE id = ? AND state = 'waiting'",
                (now, now, move.job_id),
            )
            kind = "released"
        else:
            cur = conn.execute(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, updated_at = ?"
                " WHERE id = ? AND state = 'waiting'",
                (move.detail, now, now, move.job_id),
            )
            kind = "failed"
        if cur.rowcount:
            moved += 1
            insert_event(conn, now, move.job_id, kind, "waiting", move.to_state, detail=move.detail)
    return moved


def resolve(conn: db.Conn, clock: Callable[[], float]) -> int:
    """The dependency step, inside the caller's write transaction: move every waiting job
    that can move (a failed child fails its own children in the same step); the number
    moved."""
    return apply_moves(conn, plan_moves(conn), clock)


def waiting_for(conn: db.Conn, after: list[str]) -> list[Parent]:
    """The parents not completed yet, in ``after``'s order (a missing one with state None)."""
    found = parents(conn, after)
    out = [found.get(name, Parent(name, None)) for name in after]
    return [parent for parent in out if parent.state != "completed"]


def waiting_text(pending: list[Parent]) -> str:
    """'waiting for job-a (running), job-b (pending)'."""
    named = ", ".join(f"{p.name} ({p.state or 'no such job'})" for p in pending)
    return f"waiting for {named}" if named else "waiting: every parent completed; released soon"


# checks that keep the graph acyclic ------------------------------------------------------
def submitted_edges(conn: db.Conn, skip: Collection[str] = ()) -> dict[str, list[str]]:
    """``name -> after`` of the unfinished jobs that were submitted (not in the manifest),
    except the names in ``skip``: the part of the graph a manifest does not hold."""
    rows = conn.execute(
        "SELECT id, name, spec FROM jobs WHERE origin = 'submit' AND in_manifest = 0"
        " AND state NOT IN ('completed', 'failed', 'cancelled') ORDER BY seq"
    ).fetchall()
    return {
        r["name"]: list(SPECS.get(r["id"], r["spec"]).after) for r in rows if r["name"] not in skip
    }


def check_reload(conn: db.Conn, manifest: Manifest) -> None:
    """Refuse (``BadRequest``, with problems) a manifest whose ``after`` names a job neither
    in it nor submitted, whose new jobs take the name of an unfinished submitted job, or
    that closes a cycle through submitted jobs."""
    names = {job.name for job in manifest.jobs}
    submitted = submitted_edges(conn)
    outside = sorted({n for job in manifest.jobs for n in job.after if n not in names})
    known = _submitted_names(conn, outside)
    problems = [
        f"jobs ({job.name!r}).after: no job named {name!r} in the manifest or submitted"
        for job in manifest.jobs
        for name in job.after
        if name not in names and name not in known
    ]
    ids = {job_id(job) for job in manifest.jobs}
    for row in conn.execute(
        "SELECT id, name, state FROM jobs WHERE origin = 'submit' AND in_manifest = 0"
        " AND state NOT IN ('completed', 'failed', 'cancelled')"
    ).fetchall():
        if row["name"] in names and row["id"] not in ids:
            problems.append(
                f"jobs ({row['name']!r}).name: held by a submitted job ({row['id'][:12]},"
                f" {row['state']}); rename it, or cancel the submitted job first"
            )
    edges = {**submitted, **{job.name: list(job.after) for job in manifest.jobs}}
    cycle = find_cycle(edges)
    if cycle is not None:
        via = sorted(set(cycle) & set(submitted) - names)
        problems.append(
            f"after: dependency cycle {cycle_text(cycle)}"
            + (f" (through submitted job(s) {', '.join(via)})" if via else "")
        )
    if problems:
        raise BadRequest("the manifest's dependencies cannot be applied", problems=problems)


def _submitted_names(conn: db.Conn, names: list[str]) -> set[str]:
    """Which of ``names`` a submitted job (in any state) has."""
    if not names:
        return set()
    marks = ", ".join("?" for _ in names)
    rows = conn.execute(
        f"SELECT DISTINCT name FROM jobs WHERE origin = 'submit' AND name IN ({marks})",
        tuple(names),
    ).fetchall()
    return {r["name"] for r in rows}


def check_submit_cycle(conn: db.Conn, name: str, after: list[str]) -> None:
    """Refuse a submitted job whose ``after`` would close a cycle with the jobs still
    waiting (a requeued job may wait again for a name the new job takes)."""
    edges = {
        r["name"]: list(SPECS.get(r["id"], r["spec"]).after)
        for r in conn.execute(
            f"SELECT id, name, spec FROM jobs WHERE state = 'waiting' AND {CURRENT} ORDER BY seq"
        ).fetchall()
    }
    edges[name] = list(after)
    cycle = find_cycle(edges)
    if cycle is not None and name in cycle:
        at = cycle.index(name)  # told from the job at hand: "q -> p -> q"
        raise BadRequest(f"after: dependency cycle {cycle_text(cycle[at:-1] + cycle[: at + 1])}")
