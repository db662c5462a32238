"""The training market's storage: competitions, submissions, referee reports, the ledger.

Plain functions on a ``db.Conn`` (both engines), like the other ``sqlite_`` modules; the
writes run inside the caller's write transaction (``SQLQueue`` opens it), so each is atomic:

- ``submit`` records a submission and inserts its referee jobs (``kind = "referee"``,
  ``panel`` = the submission id, pinned: claimable though in no manifest) together, or
  answers a resubmission as a ``duplicate`` with no jobs;
- ``record_referee_report`` stores one report per panel slot; asking again is a no-op;
- ``decide`` writes the verdict, and for a paid one the ledger row and the frontier move, in
  the same transaction. Paying once is the ledger's ``UNIQUE(submission_id)`` and the
  ``state = 'refereeing'`` precondition; the frontier move is guarded by the frontier the
  submission was judged against (``verify.market`` explains the rules and this choice).

The ledger is append-only: nothing here, or anywhere, updates or deletes its rows. Balances
are derived from it. Non-finite numbers (a NaN improvement of a refused report) are stored
as NULL: SQLite has no NaN.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from typing import Any

from trainfleet.errors import BadRequest, Conflict, NotFound, StaleEpoch
from trainfleet.manifest.spec import JobSpec
from trainfleet.queue.base import JobRecord
from trainfleet.queue.db import Conn, Row
from trainfleet.queue.market_base import (
    CompetitionRecord,
    LedgerEntry,
    RefereeReportRecord,
    SubmissionRecord,
)
from trainfleet.queue.sqlite_schema import (
    SPEC_COLUMNS,
    SPEC_MARKS,
    insert_event,
    job_record,
    read_meta,
    scheduling_columns,
)
from trainfleet.queue.sqlite_workers import release_worker
from trainfleet.verify.market import FRONTIER_MOVED, OPERATOR, CompetitionSpec
from trainfleet.verify.panel import RefereeReport, Verdict
from trainfleet.verify.spec import RefereeTask

SHA256_HEX = frozenset("0123456789abcdef")
MAX_PRODUCER = 253
MAX_LISTED = 10_000  # submissions or ledger rows one read returns at most
MAX_REFEREEING = 8
"""Submissions one host may have refereeing at once in a competition. Each costs the fleet a
panel of referee jobs, and a model with one weight changed is new bytes: without a bound, an
enrolled host could queue panels faster than the fleet runs them. The operator is not
bounded."""


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _check_sha(sha256: str, what: str) -> None:
    if len(sha256) != 64 or not set(sha256) <= SHA256_HEX:
        raise BadRequest(f"{what} must be a sha256: 64 lowercase hex digits")


# rows -> records ------------------------------------------------------------------------
def competition_record(row: Row) -> CompetitionRecord:
    d = dict(row)
    d["spec"] = CompetitionSpec.model_validate_json(d["spec"])
    return CompetitionRecord(**d)


def report_record(row: Row) -> RefereeReportRecord:
    d = dict(row)
    d["index"] = d.pop("idx")
    d["ok"], d["certified"] = bool(d["ok"]), bool(d["certified"])
    return RefereeReportRecord(**d)


def submission_record(row: Row, reports: list[RefereeReportRecord]) -> SubmissionRecord:
    return SubmissionRecord(**dict(row), reports=reports)


def ledger_entry(row: Row) -> LedgerEntry:
    return LedgerEntry(**dict(row))


# competitions ---------------------------------------------------------------------------
def competition_id(spec: CompetitionSpec, baseline: str) -> str:
    """sha256 of the canonical JSON of the terms and the baseline."""
    body = {"spec": spec.model_dump(mode="json"), "baseline": baseline}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def create_competition(
    conn: Conn, spec: CompetitionSpec, baseline: str, baseline_score: float, now: float
) -> CompetitionRecord:
    """A new competition whose frontier is its baseline. ``Conflict`` if the name is taken."""
    _check_sha(baseline, "the baseline")
    if not math.isfinite(baseline_score):
        raise BadRequest(f"the baseline's score {baseline_score} is not a finite loss")
    if conn.execute("SELECT 1 FROM competitions WHERE name = ?", (spec.name,)).fetchone():
        raise Conflict(f"a competition named {spec.name} exists already")
    cid = competition_id(spec, baseline)
    conn.execute(
        "INSERT INTO competitions (id, name, spec, baseline, baseline_score, frontier,"
        " frontier_score, frontier_submission, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)",
        (cid, spec.name, spec.model_dump_json(), baseline, baseline_score, baseline,
         baseline_score, now),
    )  # fmt: skip
    return get_competition(conn, cid)


def get_competition(conn: Conn, ref: str) -> CompetitionRecord:
    """A competition by id or name."""
    row = conn.execute("SELECT * FROM competitions WHERE id = ?", (ref,)).fetchone()
    if row is None:
        row = conn.execute("SELECT * FROM competitions WHERE name = ?", (ref,)).fetchone()
    if row is None:
        raise NotFound(f"no competition {ref[:200]!r}")
    return competition_record(row)


def list_competitions(conn: Conn) -> list[CompetitionRecord]:
    rows = conn.execute("SELECT * FROM competitions ORDER BY created_at, name").fetchall()
    return [competition_record(r) for r in rows]


# submissions ----------------------------------------------------------------------------
def submit(
    conn: Conn,
    competition_ref: str,
    sha256: str,
    size: int,
    producer: str,
    claim: float,
    tasks: list[JobSpec],
    now: float,
    submission_id: str | None = None,
) -> SubmissionRecord:
    """Record a submission and insert its referee jobs, or record it as a ``duplicate``
    (no jobs) when its model is the baseline or a submission of the competition still
    refereeing or accepted. ``tasks`` are the panel's jobs, built against the current
    frontier (``Conflict`` if it has moved since)."""
    competition = get_competition(conn, competition_ref)
    _check_sha(sha256, "the model")
    if size < 0 or not 0 < len(producer) <= MAX_PRODUCER:
        raise BadRequest("a submission needs a size >= 0 and a producer of 1 to 253 characters")
    if not math.isfinite(claim):
        raise BadRequest(f"claim {claim} is not a finite loss")
    sid = submission_id or uuid.uuid4().hex
    if not 0 < len(sid) <= 128:
        raise BadRequest("a submission id has 1 to 128 characters")
    if conn.execute("SELECT 1 FROM submissions WHERE id = ?", (sid,)).fetchone():
        raise Conflict(f"submission {sid[:12]} exists already")
    seq = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM submissions WHERE competition_id = ?",
        (competition.id,),
    ).fetchone()[0]
    original = _original(conn, competition, sha256)
    state, verdict = "refereeing", ""
    if original is not None:
        state, verdict = "duplicate", f"resubmission of {original}: pays nothing"
    else:
        _check_open(conn, competition, producer)
        _check_panel(competition, sid, sha256, producer, tasks)
    conn.execute(
        "INSERT INTO submissions (id, seq, competition_id, sha256, size, producer, claim, state,"
        " frontier, frontier_score, paid, verdict, created_at, decided_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
        (sid, seq + 1, competition.id, sha256, size, producer, claim, state,
         competition.frontier, competition.frontier_score, verdict, now,
         now if state == "duplicate" else None),
    )  # fmt: skip
    if state == "refereeing":
        _insert_referee_jobs(conn, tasks, now)
    return get_submission(conn, sid)


def _original(conn: Conn, competition: CompetitionRecord, sha256: str) -> str | None:
    """What a model with these bytes resubmits ('the baseline', 'submission ID (#seq)'),
    or None for a model new to the competition (or only ever rejected: it may retry)."""
    if sha256 == competition.baseline:
        return "the baseline"
    row = conn.execute(
        "SELECT id, seq FROM submissions WHERE competition_id = ? AND sha256 = ?"
        " AND state IN ('refereeing', 'accepted') ORDER BY seq LIMIT 1",
        (competition.id, sha256),
    ).fetchone()
    return None if row is None else f"submission {row['id'][:12]} (#{row['seq']})"


def _check_open(conn: Conn, competition: CompetitionRecord, producer: str) -> None:
    """``Conflict`` if ``producer`` (a host) has ``MAX_REFEREEING`` submissions of this
    competition still refereeing."""
    if producer == OPERATOR:
        return
    open_now = conn.execute(
        "SELECT COUNT(*) FROM submissions WHERE competition_id = ? AND producer = ?"
        " AND state = 'refereeing'",
        (competition.id, producer),
    ).fetchone()[0]
    if open_now >= MAX_REFEREEING:
        raise Conflict(
            f"{producer} has {open_now} submissions to {competition.name} still refereeing,"
            f" the most a host may have at once ({MAX_REFEREEING}); submit again once one"
            " is decided"
        )


def _check_panel(
    competition: CompetitionRecord, sid: str, sha256: str, producer: str, tasks: list[JobSpec]
) -> None:
    """The panel's jobs must be the competition's ``n`` referee tasks of this submission,
    against the current frontier (``Conflict`` if it moved since they were built)."""
    n = competition.spec.referees
    found = sorted(t.task.index for t in tasks if isinstance(t.task, RefereeTask))
    if len(tasks) != n or found != list(range(n)):
        raise ValueError(f"a submission needs {n} referee tasks, indexed 0..{n - 1}")
    for job in tasks:
        task = job.task
        assert isinstance(task, RefereeTask) and job.kind == "referee"
        expected = (sid, competition.id, sha256, producer)
        got = (task.submission_id, task.competition_id, task.candidate, task.producer)
        if got != expected:
            raise ValueError(f"referee task {task.index} names {got}, not {expected}")
        if task.frontier != competition.frontier:
            raise Conflict(
                f"competition {competition.name}'s frontier moved while the submission was"
                " made; submit again"
            )


def _insert_referee_jobs(conn: Conn, tasks: list[JobSpec], now: float) -> None:
    """Insert a panel's jobs: not in any manifest, pinned (claimable), pending."""
    from trainfleet.manifest.identity import job_id

    mhash = read_meta(conn, "manifest_hash", "")
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]
    for spec in tasks:
        seq += 1
        jid = job_id(spec)
        conn.execute(
            f"INSERT INTO jobs (id, seq, name, state, {SPEC_COLUMNS}, created_at, updated_at,"
            f" pending_since, manifest_hash, in_manifest, pinned) VALUES (?, ?, ?, 'pending',"
            f" {SPEC_MARKS}, ?, ?, ?, ?, 0, 1)",
            (jid, seq, spec.name, *scheduling_columns(spec, jid), now, now, now, mhash),
        )
        assert isinstance(spec.task, RefereeTask)
        detail = f"referee {spec.task.index} of submission {spec.task.submission_id[:12]}"
        insert_event(conn, now, jid, "added", None, "pending", detail=detail)


def get_submission(conn: Conn, ref: str) -> SubmissionRecord:
    """A submission by id, or by an unambiguous hex id prefix (at least 4 digits)."""
    row = conn.execute("SELECT * FROM submissions WHERE id = ?", (ref,)).fetchone()
    if row is None and len(ref) >= 4 and set(ref) <= SHA256_HEX:
        rows = conn.execute(
            "SELECT * FROM submissions WHERE id >= ? AND id < ? ORDER BY id LIMIT 2",
            (ref, ref + "g"),
        ).fetchall()
        if len(rows) > 1:
            raise BadRequest(f"{ref!r} is ambiguous: use a longer submission id")
        row = rows[0] if rows else None
    if row is None:
        raise NotFound(f"no submission {ref[:200]!r}")
    return submission_record(row, _reports(conn, [row["id"]]).get(row["id"], []))


def list_submissions(conn: Conn, competition_ref: str) -> list[SubmissionRecord]:
    """A competition's submissions, in the order they came: the newest ``MAX_LISTED``
    (a long competition's oldest fall off the list, never its latest)."""
    competition = get_competition(conn, competition_ref)
    rows = conn.execute(
        "SELECT * FROM submissions WHERE competition_id = ? ORDER BY seq DESC LIMIT ?",
        (competition.id, MAX_LISTED),
    ).fetchall()[::-1]
    reports = _reports(conn, [r["id"] for r in rows])  # of the listed ones only
    return [submission_record(r, reports.get(r["id"], [])) for r in rows]


def refereeing_submissions(conn: Conn) -> list[SubmissionRecord]:
    """Every submission still waiting for its panel, oldest first."""
    rows = conn.execute(
        "SELECT * FROM submissions WHERE state = 'refereeing' ORDER BY created_at, seq"
    ).fetchall()
    reports = _reports(conn, [r["id"] for r in rows])
    return [submission_record(r, reports.get(r["id"], [])) for r in rows]


def panel_jobs(conn: Conn, submission_id: str) -> list[JobRecord]:
    """The referee jobs of a submission, in panel order."""
    rows = conn.execute("SELECT * FROM jobs WHERE panel = ? ORDER BY seq", (submission_id,))
    return [job_record(r) for r in rows.fetchall()]


def holds_model(conn: Conn, worker_id: str, sha256: str) -> bool:
    """Whether ``worker_id`` holds an active referee job naming model ``sha256`` (candidate
    or frontier), or an active producer job of a pipeline whose teacher model it is (issue
    11): the worker's own active jobs (``jobs_by_worker``, a handful) are read, never the
    queue's."""
    rows = conn.execute(
        "SELECT * FROM jobs WHERE worker_id = ? AND state IN ('claimed', 'running')"
        " AND (panel IS NOT NULL OR pipeline_id IS NOT NULL)",
        (worker_id,),
    ).fetchall()
    for row in rows:
        spec = job_record(row).spec
        task = spec.task
        if isinstance(task, RefereeTask) and sha256 in (task.candidate, task.frontier):
            return True
        if spec.kind == "producer" and row["pipeline_id"] is not None:
            teacher = conn.execute(
                "SELECT teacher_model FROM pipelines WHERE id = ?", (row["pipeline_id"],)
            ).fetchone()
            if teacher is not None and teacher["teacher_model"] == sha256:
                return True
    return False


def panel_hosts(conn: Conn, panel: str | None, job_id: str) -> set[str]:
    """The hosts that took a job of ``panel`` other than ``job_id`` (for ``explain``)."""
    if panel is None:
        return set()
    rows = conn.execute(
        "SELECT DISTINCT host FROM jobs WHERE panel = ? AND id <> ? AND host IS NOT NULL",
        (panel, job_id),
    )
    return {r["host"] for r in rows.fetchall()}


def attested_workers(conn: Conn, now: float) -> set[str]:
    """The ids of the workers whose attestation is valid now (for ``explain``)."""
    rows = conn.execute("SELECT id FROM workers WHERE attested_until > ?", (now,))
    return {r["id"] for r in rows.fetchall()}


def _reports(conn: Conn, submission_ids: list[str]) -> dict[str, list[RefereeReportRecord]]:
    out: dict[str, list[RefereeReportRecord]] = {}
    for start in range(0, len(submission_ids), 500):
        chunk = submission_ids[start : start + 500]
        marks = ", ".join("?" for _ in chunk)
        rows = conn.execute(
            f"SELECT * FROM referee_reports WHERE submission_id IN ({marks})"
            " ORDER BY submission_id, idx",
            tuple(chunk),
        ).fetchall()
        for row in rows:
            out.setdefault(row["submission_id"], []).append(report_record(row))
    return out


# reports and decisions ------------------------------------------------------------------
def record_referee_report(
    conn: Conn, job_id: str, epoch: int, report: RefereeReport, now: float
) -> SubmissionRecord:
    """Store the report of referee job ``job_id`` (its attempt ``epoch``) for its panel
    slot. Idempotent: a slot that has a report keeps the first."""
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None or row["panel"] is None:
        raise NotFound(f"no referee job {job_id[:200]!r}")
    if row["epoch"] != epoch:
        raise StaleEpoch(f"referee job {job_id[:12]} is at epoch {row['epoch']}, not {epoch}")
    task = job_record(row).spec.task
    assert isinstance(task, RefereeTask)
    if report.index != task.index:
        raise ValueError(f"a report for slot {report.index} from referee {task.index}'s job")
    candidate, gate = report.candidate, report.gate
    conn.execute(
        "INSERT INTO referee_reports (submission_id, idx, job_id, worker_id, host, ok, mean,"
        " lo, hi, improvement, lower, certified, reason, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (submission_id, idx) DO NOTHING",
        (task.submission_id, task.index, job_id, report.worker_id, report.host,
         int(report.ok), _finite(candidate.mean), _finite(candidate.lo), _finite(candidate.hi),
         _finite(gate.improvement), _finite(gate.lower), int(gate.certified),
         report.reason[:2000], now),
    )  # fmt: skip
    return get_submission(conn, task.submission_id)


def decide(
    conn: Conn, submission_id: str, verdict: Verdict, paid: float, now: float
) -> SubmissionRecord:
    """Write the panel's verdict. With ``paid > 0``: the ledger row and the frontier move
    too, only if the frontier is still the one the submission was judged against (else it
    is rejected with ``FRONTIER_MOVED`` and nothing is paid). A decided submission is
    returned unchanged: deciding twice pays once."""
    row = conn.execute("SELECT * FROM submissions WHERE id = ?", (submission_id,)).fetchone()
    if row is None:
        raise NotFound(f"no submission {submission_id[:200]!r}")
    if row["state"] != "refereeing":
        return get_submission(conn, submission_id)
    if not math.isfinite(paid) or paid < 0:
        raise ValueError(f"a payment of {paid} credits")
    state, reason = verdict.state, verdict.reason
    if paid > 0:
        if (
            state != "accepted"
            or not math.isfinite(verdict.improvement)
            or verdict.improvement <= 0
        ):
            raise ValueError("only an accepted verdict with a positive improvement is paid")
        before = row["frontier_score"]
        after = before - verdict.improvement
        moved = conn.execute(
            "UPDATE competitions SET frontier = ?, frontier_score = ?, frontier_submission = ?"
            " WHERE id = ? AND frontier = ?",
            (row["sha256"], after, submission_id, row["competition_id"], row["frontier"]),
        ).rowcount
        if moved == 1:
            conn.execute(
                "INSERT INTO market_ledger (competition_id, submission_id, account, amount,"
                " frontier_before, frontier_after, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row["competition_id"], submission_id, row["producer"], paid, before, after, now),
            )
            _retire_stale_panels(conn, row, now)
        else:
            state, reason, paid = "rejected", f"{FRONTIER_MOVED} ({reason})", 0.0
    conn.execute(
        "UPDATE submissions SET state = ?, trusted_score = ?, improvement = ?, paid = ?,"
        " verdict = ?, decided_at = ? WHERE id = ? AND state = 'refereeing'",
        (state, _finite(verdict.trusted_score), _finite(verdict.improvement), paid,
         reason[:4000], now, submission_id),
    )  # fmt: skip
    return get_submission(conn, submission_id)


def _retire_stale_panels(conn: Conn, paid: Row, now: float) -> None:
    """The frontier just moved past ``paid``'s: every other submission still refereed
    against the old frontier is decided now (rejected, ``FRONTIER_MOVED``: its panel compares
    it with a model that is no longer the one to beat), and its referee jobs are cancelled,
    so no referee spends more time on a verdict that can no longer count."""
    stale = conn.execute(
        "SELECT id FROM submissions WHERE competition_id = ? AND state = 'refereeing'"
        " AND frontier = ? AND id <> ?",
        (paid["competition_id"], paid["frontier"], paid["id"]),
    ).fetchall()
    reason = f"{FRONTIER_MOVED} (submission {paid['id'][:12]} moved it first)"
    for sub in stale:
        conn.execute(
            "UPDATE submissions SET state = 'rejected', verdict = ?, decided_at = ?"
            " WHERE id = ? AND state = 'refereeing'",
            (reason, now, sub["id"]),
        )
        jobs = conn.execute(
            "SELECT id, state, worker_id FROM jobs WHERE panel = ?"
            " AND state IN ('pending', 'claimed', 'running')",
            (sub["id"],),
        ).fetchall()
        for job in jobs:
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?,"
                " error = ? WHERE id = ?",
                (now, now, reason, job["id"]),
            )
            release_worker(conn, job["worker_id"], job["id"])
            insert_event(
                conn, now, job["id"], "cancelled", job["state"], "cancelled", detail=reason
            )


# the ledger -----------------------------------------------------------------------------
def ledger(conn: Conn, competition_ref: str | None = None) -> list[LedgerEntry]:
    """Payments in the order they were made (one competition's, or all): the newest
    ``MAX_LISTED`` (balances, ``balances``, always sum every entry)."""
    if competition_ref is None:
        rows = conn.execute("SELECT * FROM market_ledger ORDER BY seq DESC LIMIT ?", (MAX_LISTED,))
    else:
        cid = get_competition(conn, competition_ref).id
        rows = conn.execute(
            "SELECT * FROM market_ledger WHERE competition_id = ? ORDER BY seq DESC LIMIT ?",
            (cid, MAX_LISTED),
        )
    return [ledger_entry(r) for r in rows.fetchall()[::-1]]


def balances(conn: Conn, competition_ref: str | None = None) -> dict[str, float]:
    """Credits paid to each account: sums of the ledger, never stored."""
    sql = "SELECT account, SUM(amount) AS total FROM market_ledger"
    params: tuple[Any, ...] = ()
    if competition_ref is not None:
        sql += " WHERE competition_id = ?"
        params = (get_competition(conn, competition_ref).id,)
    rows = conn.execute(sql + " GROUP BY account ORDER BY account", params).fetchall()
    return {r["account"]: float(r["total"]) for r in rows}
