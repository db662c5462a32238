"""Claiming: hand a worker the best pending jobs it may run, up to its free slots.

A claim picks pending jobs by priority, then manifest order, that the worker's effective
capability fits and no scheduling rule defers, and bumps each job's *epoch* (the fence every
later write of the attempt names). A worker registers with ``slots`` (default 1) and holds at
most that many active jobs; the worker daemon runs one, batch clients (referees, benchmarks)
ask for several in one request (``claim_many``).

A claim is idempotent: a worker that asks again while it holds claims it never heartbeat
(the reply was lost) gets those claims back, same epoch, nothing counted. A worker whose
every slot holds a running job gets a 409 naming one.

Two rules beyond capability and scheduling (issue 10), checked in ``_choose``:

- a referee job (``kind = "referee"``) goes only to a worker on an *enrolled* host (not an
  ``open:`` one) that did not produce the model under review, nor the frontier it challenges,
  and has not taken another job of the same panel: distinct hosts, not distinct workers,
  since one machine running three workers is one referee (``referee_blocker``). On
  PostgreSQL, where claims run side by side, the panel is locked for the claim
  (``pg_try_advisory_xact_lock``) so two workers of one host cannot take two of its jobs at
  once; a claim that finds it locked skips the job;
- a private job (``tier = "private"``) goes only to a worker whose attestation is valid
  now (``workers.attested_until``, read with the worker's row; ``tier_blocker``).

The fast path (issue 9): no pydantic parse per pending row (``fleet_cache.SPECS``: a spec is
parsed once per stored text) and no scan of the workers table: the claimant's effective
capability and the host policies come from ``FleetCache``; the other workers matter only to
the host-priority rule, so they are read only when some host has a higher priority than the
claimant's, and then only the idle workers of those hosts. Jobs no claimer of a class may
take pile up at the head of the claim order (pinned to busy hosts, denied by host rules), so
the scan must not pay for them on every claim: the SQL leaves out the jobs pinned to other
hosts (``host_filter`` on the ``allowed_hosts`` column), reads four columns instead of the
whole row, and the rest of ``matching.blockers``'s verdict is remembered per job and worker
class (``FleetCache.blocked``). The job row is taken with its
precondition in the WHERE clause (``state = 'pending'``) and ``RETURNING`` the new epoch, so a
row another claim took first is skipped, never claimed twice.

Each function runs on a connection the caller has already put inside a write transaction
(on PostgreSQL a shared one: claims run side by side, rows locked ``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from trainfleet.capability.model import OPEN_HOST_PREFIX
from trainfleet.errors import Conflict
from trainfleet.manifest.spec import JobSpec
from trainfleet.queue.base import Claim, QueueSettings
from trainfleet.queue.db import Conn, Dialect, Row
from trainfleet.queue.fleet_cache import SPECS, FleetCache, Member
from trainfleet.queue.scheduling import Candidate, deferrals
from trainfleet.queue.sqlite_attempts import Later, affinity_wait
from trainfleet.queue.sqlite_schema import (
    EventRow,
    insert_events,
    job_record,
    load_job,
)
from trainfleet.queue.sqlite_workers import touch
from trainfleet.verify.spec import RefereeTask

MAX_CLAIMS = 64  # jobs one request may claim
PANEL_LOCK_CLASS = 0x74665000  # "tfP": the two-key advisory locks of referee panels


def claim_many(
    conn: Conn,
    worker_id: str,
    clock: Callable[[], float],
    settings: QueueSettings,
    max_jobs: int = 1,
    *,
    fleet: FleetCache | None = None,
    later: Later | None = None,
) -> list[Claim]:
    """Up to ``max_jobs`` claims for ``worker_id``: its unacknowledged claims again, then new
    jobs for its free slots. ``Conflict`` if every slot holds a running job. ``later``: where
    a group commit collects the claims' events (``SQLiteDatabase.group``), else written here."""
    fleet = fleet or FleetCache()
    wrow = touch(conn, worker_id, clock())
    slots = worker_slots(wrow)
    held = _held(conn, wrow, slots)
    again = [r for r in held if r["state"] == "claimed"][:max_jobs]
    events: list[EventRow] = []  # the claims' events, written together at the end
    out = [_redeliver(conn, r, worker_id, clock, events) for r in again]
    free = min(max_jobs - len(out), slots - len(held))
    if free <= 0:
        if not out and held:
            busy = held[0]
            raise Conflict(
                f"worker {worker_id} still holds job {busy['id'][:12]} ({busy['state']});"
                " complete or fail it first"
                + (f" (all {slots} of its slots are busy)" if slots > 1 else ""),
                job_id=busy["id"],
                epoch=busy["epoch"],
                state=busy["state"],
            )
        _write_events(conn, events, later)
        return out
    me = fleet.member(conn, wrow)
    attested = attested_until(wrow) > clock()
    taken = None
    for row in _choose(conn, me, clock(), settings, fleet, free, attested=attested):
        got = _take(conn, row, me, clock, events)
        if got is not None:
            out.append(got)
            taken = got.job.id
    _write_events(conn, events, later)
    if taken is not None:  # once for the batch: the worker's current job is its last claim
        conn.execute("UPDATE workers SET current_job = ? WHERE id = ?", (taken, worker_id))
    return out


def _write_events(conn: Conn, events: list[EventRow], later: Later | None) -> None:
    if later is None:
        insert_events(conn, events)
    else:
        later.events.extend(events)


def worker_slots(wrow: Row) -> int:
    """The jobs a worker may hold at once (1 for a row written before slots existed)."""
    try:
        return max(1, int(wrow["slots"]))
    except (IndexError, KeyError):
        return 1


def attested_until(wrow: Row) -> float:
    """Until when the worker's attestation is valid (-inf: never attested)."""
    try:
        until = wrow["attested_until"]
    except (IndexError, KeyError):
        return float("-inf")
    return float("-inf") if until is None else float(until)


def tier_blocker(spec: JobSpec, attested: bool) -> str | None:
    """Why a worker may not take a private job (None: it may, or the job is public)."""
    if spec.tier == "private" and not attested:
        return "private: needs an attested worker (a valid attestation, not expired)"
    return None


def referee_blocker(conn: Conn, spec: JobSpec, host: str, job_id: str) -> str | None:
    """Why a worker on ``host`` may not take referee job ``job_id`` (None: it may)."""
    return referee_host_blocker(spec, host) or panel_blocker(conn, spec, host, job_id)


def referee_host_blocker(spec: JobSpec, host: str) -> str | None:
    """The rules on the host alone: enrolled, and not the producer of the model."""
    task = spec.task
    if not isinstance(task, RefereeTask):
        return None
    if host.startswith(OPEN_HOST_PREFIX):
        return "a referee must be an enrolled host; this one joined in open mode"
    if host == task.producer:
        return f"host {host} produced the model under review"
    return None


def panel_blocker(conn: Conn, spec: JobSpec, host: str, job_id: str) -> str | None:
    """The rules on the panel: no other of its jobs was taken by a worker of ``host``, and
    ``host`` did not produce the frontier model the submission is compared with."""
    task = spec.task
    if not isinstance(task, RefereeTask):
        return None
    taken = conn.execute(
        "SELECT 1 FROM jobs WHERE panel = ? AND host = ? AND id <> ? LIMIT 1",
        (task.submission_id, host, job_id),
    ).fetchone()
    if taken is not None:
        return f"host {host} already took a job of this panel (one referee per host)"
    incumbent = conn.execute(
        "SELECT 1 FROM submissions WHERE competition_id = ? AND sha256 = ? AND producer = ?"
        " AND state = 'accepted' LIMIT 1",
        (task.competition_id, task.frontier, host),
    ).fetchone()
    if incumbent is not None:  # it would gain by under-reporting every challenger
        return f"host {host} produced the frontier model this submission challenges"
    return None


def _held(conn: Conn, wrow: Row, slots: int) -> list[Row]:
    """The active jobs the worker holds. One slot: its ``current_job`` (a primary-key read);
    several: its active jobs by worker (``jobs_by_worker``)."""
    if slots == 1:
        if wrow["current_job"] is None:
            return []
        row = conn.execute(
            "SELECT * FROM jobs WHERE id = ? AND worker_id = ?", (wrow["current_job"], wrow["id"])
        ).fetchone()
        return [row] if row is not None and row["state"] in ("claimed", "running") else []
    return list(
        conn.execute(
            "SELECT * FROM jobs WHERE worker_id = ? AND state IN ('claimed', 'running')"
            " ORDER BY priority DESC, seq",
            (wrow["id"],),
        ).fetchall()
    )


def _choose(
    conn: Conn,
    me: Member,
    now: float,
    settings: QueueSettings,
    fleet: FleetCache,
    limit: int,
    *,
    attested: bool = False,
) -> list[Row]:
    """The first ``limit`` pending rows ``me`` may take now, in claim order. Collected before
    any is written, so the scan never reads rows its own writes moved (so one panel's jobs
    are counted here too: at most one of them per claim)."""
    cap = me.cap
    wait_s = fleet.prefer_cuda_wait_s(conn)
    mine = Candidate(me.worker_id, cap, me.policy, idle=True)
    others = _idle_betters(conn, me, now, settings, fleet)
    rows = _pending(
        conn,
        f"SELECT id, epoch, pending_since, spec, priority, fair, seq FROM jobs{_claim_index(conn)}"
        " WHERE state = 'pending'"
        " AND (in_manifest = 1 OR pinned = 1) AND (require_cuda = 0 OR ? = 1)"
        " AND min_vram_gib <= ? AND min_ram_gib <= ? AND min_cores <= ?"
        f" AND (tier = 'public' OR ? = 1) AND {host_filter(conn)}",
        [int(cap.cuda), cap.vram_gib, cap.ram_gib, cap.cores, int(attested), f",{cap.host},"],
        limit,
    )
    chosen: list[Row] = []
    panels: set[str] = set()
    for row in rows:
        if fleet.blocked(me, row["id"], row["spec"]):  # a dict lookup after the first time
            continue
        spec: JobSpec = SPECS.get(row["id"], row["spec"])
        if tier_blocker(spec, attested):
            continue
        panel = spec.panel
        if panel is not None and (  # the panel is locked before its hosts are read
            panel in panels
            or referee_host_blocker(spec, me.host)
            or not _lock_panel(conn, panel)
            or panel_blocker(conn, spec, me.host, row["id"])
        ):
            continue
        pending_for = now - row["pending_since"]
        if deferrals(spec, mine, others, pending_for, wait_s):
            continue
        if spec.kind == "replica" and affinity_wait(
            conn, spec, me.worker_id, pending_for, now, settings.offline_after_s
        ):
            continue
        if not _lock_pending(conn, row["id"]):
            continue
        chosen.append(row)
        if panel is not None:
            panels.add(panel)
        if len(chosen) >= limit:
            break
    return chosen


# The claim order, and on PostgreSQL the condition for the rows after a page's last one
# (keyset paging: rows other claims take meanwhile drop out without shifting a page).
CLAIM_ORDER = " ORDER BY priority DESC, fair, seq"
_AFTER = (
    " AND (priority < ? OR (priority = ? AND (fair > ? OR (fair = ? AND (seq > ?"
    " OR (seq = ? AND id > ?))))))"
)
FIRST_PAGE = 16  # rows of the first page on PostgreSQL, at least (4 per claim wanted)
MAX_PAGE = 1024


def _pending(conn: Conn, sql: str, params: list[object], limit: int) -> Iterator[Row]:
    """The rows of ``sql`` (the claim's scan) in claim order, read as the claim goes.

    SQLite steps its cursor lazily: a claim reads only the rows it passes over. psycopg
    fetches a whole result at once, which made every claim on PostgreSQL carry every
    pending row its worker could take, spec and all (about 500 rows per claim in
    ``bench.queue``'s PostgreSQL arm). There the rows come in pages of a few times what
    the claim wants, each after the last row of the one before."""
    if conn.dialect != Dialect.POSTGRES:
        yield from conn.execute(sql + CLAIM_ORDER, params)
        return
    page, after = max(FIRST_PAGE, 4 * limit), None
    while True:
        keyset: list[object] = []
        if after is not None:
            p, f, q, i = after
            keyset = [p, p, f, f, q, q, i]
        rows = conn.execute(
            sql + (_AFTER if after is not None else "") + CLAIM_ORDER + ", id LIMIT ?",
            [*params, *keyset, page],
        ).fetchall()
        yield from rows
        if len(rows) < page:
            return
        last = rows[-1]
        after = (last["priority"], last["fair"], last["seq"], last["id"])
        page = min(2 * page, MAX_PAGE)


def _claim_index(conn: Conn) -> str:
    """SQLite's planner prefers the claim-order index (``state = ?`` first) to the partial
    index of pending rows that holds every column the scan filters on (migration 5); told
    which, a row the filter drops costs no read of the table (half the scan's time over a
    pile of pinned jobs). PostgreSQL's planner chooses by its statistics."""
    return "" if conn.dialect == Dialect.POSTGRES else " INDEXED BY jobs_pending_claim"


def host_filter(conn: Conn) -> str:
    """The SQL that passes the jobs a worker on a host may take by their ``allowed_hosts``
    column (``sqlite_schema.host_list``), given ``",HOST,"`` as its parameter: the pinned
    jobs of other hosts never leave the database. A prefilter: ``matching.blockers`` still
    decides each row that passes."""
    find = (
        "strpos(allowed_hosts, ?)"
        if conn.dialect == Dialect.POSTGRES
        else "instr(allowed_hosts, ?)"
    )
    return f"(allowed_hosts IS NULL OR {find} > 0)"


def _idle_betters(
    conn: Conn, me: Member, now: float, settings: QueueSettings, fleet: FleetCache
) -> list[Candidate]:
    """The idle online workers of hosts with a higher priority than ``me``'s: the only others
    the scheduling rules compare a claimant with. None are read when no host outranks it."""
    better = fleet.hosts_above(conn, me.priority)
    sql = "SELECT id FROM workers WHERE state = 'online' AND current_job IS NULL AND last_seen >= ?"
    params: list[object] = [now - min(settings.idle_window_s, settings.offline_after_s)]
    if me.priority >= 0:  # hosts without a policy (priority 0) do not outrank it
        if not better:
            return []
        sql += f" AND host IN ({', '.join('?' for _ in better)})"
        params += better
    ids = [r["id"] for r in conn.execute(sql, params).fetchall() if r["id"] != me.worker_id]
    return [
        Candidate(m.worker_id, m.cap, m.policy, idle=True)
        for m in fleet.members(conn, ids)
        if m.priority > me.priority
    ]


def _lock_pending(conn: Conn, job_id: str) -> bool:
    """Whether this claim may take the pending job ``job_id``. On SQLite the claim holds the
    one write lock, so always. On PostgreSQL claims run side by side (``tx(shared=True)``):
    the row is locked ``FOR UPDATE SKIP LOCKED`` and re-read, so a job another claim holds or
    has just taken is skipped, never claimed twice."""
    if conn.dialect != Dialect.POSTGRES:
        return True
    sql = "SELECT 1 FROM jobs WHERE id = ? AND state = 'pending' FOR UPDATE SKIP LOCKED"
    return conn.execute(sql, (job_id,)).fetchone() is not None


def _lock_panel(conn: Conn, panel: str) -> bool:
    """Whether this claim may decide on a job of ``panel``. On SQLite the claim holds the one
    write lock: always. On PostgreSQL the panel's advisory lock is tried (never waited for:
    no deadlock between claims) and held to the commit, so a second claim checks the panel's
    hosts only after the first's job row shows its host."""
    if conn.dialect != Dialect.POSTGRES:
        return True
    sql = "SELECT pg_try_advisory_xact_lock(?, hashtext(?))"
    return bool(conn.execute(sql, (PANEL_LOCK_CLASS, panel)).fetchone()[0])


def _take(
    conn: Conn, row: Row, me: Member, clock: Callable[[], float], events: list[EventRow]
) -> Claim | None:
    """Claim the pending job ``row``: fenced in the WHERE clause (still pending, same epoch),
    the claimed row RETURNED whole (no second read); None if the row moved meanwhile. The
    job takes the current manifest's hash (unchanged when no manifest was applied). The
    caller sets the worker's ``current_job``, once for all the jobs it takes, and writes the
    claim's event, appended to ``events`` (``insert_events``)."""
    now = clock()
    took = conn.execute(
        "UPDATE jobs SET state = 'claimed', epoch = epoch + 1, attempt = attempt + 1,"
        " worker_id = ?, host = ?, claimed_at = ?, heartbeat_at = ?, updated_at = ?,"
        " manifest_hash = COALESCE((SELECT value FROM meta WHERE key = 'manifest_hash'),"
        " manifest_hash), error = NULL WHERE id = ? AND state = 'pending' AND epoch = ?"
        " RETURNING *",
        (me.worker_id, me.cap.host, now, now, now, row["id"], row["epoch"]),
    ).fetchone()
    if took is None:
        return None
    epoch, attempt = int(took["epoch"]), int(took["attempt"])
    detail = f"attempt {attempt} on host {me.cap.host}"
    events.append(
        (clock(), row["id"], "claimed", "pending", "claimed", me.worker_id, epoch, detail)
    )
    return Claim(job=job_record(took), epoch=epoch, attempt=attempt)


def _redeliver(
    conn: Conn, row: Row, worker_id: str, clock: Callable[[], float], events: list[EventRow]
) -> Claim:
    """A claim ``worker_id`` already holds and never heartbeat: its reply was probably lost.

    Same epoch, same attempt, nothing counted: asking again is idempotent.
    """
    why = f"claim of attempt {row['attempt']} asked again (its reply was probably lost)"
    events.append((clock(), row["id"], "redelivered", None, None, worker_id, row["epoch"], why))
    return Claim(job=load_job(conn, row["id"]), epoch=row["epoch"], attempt=row["attempt"])


__all__ = [
    "MAX_CLAIMS",
    "attested_until",
    "claim_many",
    "host_filter",
    "referee_blocker",
    "tier_blocker",
    "worker_slots",
]
