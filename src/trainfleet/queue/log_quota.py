"""How much log text one attempt may store on the coordinator.

A worker sends its job's output through ``POST /v1/jobs/{id}/logs``; each request is bounded
(lines per request, characters per line), but without a bound per attempt a flooding or
malicious worker could fill the coordinator's disk one valid request at a time. Each attempt
may store ``MAX_LOG_LINES_PER_ATTEMPT`` lines and ``MAX_LOG_CHARS_PER_ATTEMPT`` characters
(counted after each line is cut to ``sqlite_attempts.MAX_LOG_LINE_CHARS``); later lines are
dropped, and the first drop flags the job and records a ``log_truncated`` event, so a cut
log is never mistaken for a complete one. The worker is still answered 200 (the lines it
sent were handled), with the number of lines actually stored.

Usage is counted in the ``log_usage`` table, one row per (job, attempt), so the check costs
one indexed read per request however long the log already is.
"""

from __future__ import annotations

import json

from trainfleet.queue.db import Conn
from trainfleet.queue.sqlite_schema import insert_event

MAX_LOG_LINES_PER_ATTEMPT = 100_000
MAX_LOG_CHARS_PER_ATTEMPT = 16 * 1024 * 1024


def admit_lines(
    conn: Conn,
    job_id: str,
    attempt: int,
    lines: list[str],
    *,
    now: float,
    worker_id: str,
    epoch: int,
) -> list[str]:
    """The first of ``lines`` (already cut to their stored length) that this attempt may
    still store, counted against its quota; flags the job the first time any are dropped.
    Runs inside the caller's write transaction."""
    row = conn.execute(
        "SELECT lines, chars, dropped FROM log_usage WHERE job_id = ? AND attempt = ?",
        (job_id, attempt),
    ).fetchone()
    used_lines, used_chars, dropped_before = (row[0], row[1], row[2]) if row else (0, 0, 0)
    max_lines, max_chars = MAX_LOG_LINES_PER_ATTEMPT, MAX_LOG_CHARS_PER_ATTEMPT
    kept: list[str] = []
    for line in lines:
        if used_lines + 1 > max_lines or used_chars + len(line) > max_chars:
            break
        kept.append(line)
        used_lines += 1
        used_chars += len(line)
    dropped = dropped_before + len(lines) - len(kept)
    conn.execute(
        "INSERT INTO log_usage (job_id, attempt, lines, chars, dropped) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (job_id, attempt) DO UPDATE SET lines = excluded.lines,"
        " chars = excluded.chars, dropped = excluded.dropped",
        (job_id, attempt, used_lines, used_chars, dropped),
    )
    if dropped and not dropped_before:
        flag = (
            f"attempt {attempt}: log truncated at {used_lines} lines / {used_chars} characters"
            f" (limits {max_lines} lines, {max_chars} characters per attempt);"
            " later lines were dropped"
        )
        flags = json.loads(
            conn.execute("SELECT flags FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        )
        conn.execute("UPDATE jobs SET flags = ? WHERE id = ?", (json.dumps([*flags, flag]), job_id))
        insert_event(conn, now, job_id, "log_truncated", None, None, worker_id, epoch, flag)
    return kept
