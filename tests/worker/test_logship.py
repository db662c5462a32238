"""Log lines are cut and batched to what the coordinator accepts; a full spool drops the
oldest lines and counts them."""

from __future__ import annotations

import io
import json

from trainfleet.worker.logship import LogLimits, LogSpool, encoded_size
from trainfleet.worker.process import READ_LINE_BYTES, _copy_lines


def drain(spool: LogSpool) -> list[list[str]]:
    batches = []
    while True:
        lines, mark = spool.batch()
        if not lines:
            return batches
        batches.append(lines)
        spool.commit(mark)


def test_batches_respect_the_line_count_and_byte_limits() -> None:
    limits = LogLimits(max_lines=10_000, max_batch_bytes=1 << 20)
    spool = LogSpool(limits, max_lines=10**6, max_bytes=1 << 30)
    for i in range(25_000):
        spool.add(f"line {i}")
    for _ in range(600):
        spool.add("x" * 100_000)  # cut to 4,096 characters
    batches = drain(spool)
    flat = [line for b in batches for line in b]
    assert flat[:25_000] == [f"line {i}" for i in range(25_000)]  # nothing lost, in order
    assert len(flat) == 25_600 and spool.dropped == 0
    for batch in batches:
        assert len(batch) <= 10_000
        body = json.dumps({"epoch": 1, "lines": batch}, ensure_ascii=False, separators=(",", ":"))
        body = body.encode()
        assert len(body) <= (1 << 20) + 100
        assert all(len(line) <= 4096 for line in batch)


def test_encoded_size_counts_json_escapes() -> None:
    line = '\x00\x01é"🙂'
    assert encoded_size(line) == len(json.dumps(line, ensure_ascii=False).encode()) + 1


def test_a_full_spool_drops_the_oldest_lines_and_counts_them() -> None:
    spool = LogSpool(LogLimits(), max_lines=100, max_bytes=1 << 20)
    for i in range(250):
        spool.add(f"l{i}")
    assert len(spool) == 100 and spool.dropped == 150
    lines, mark = spool.batch()
    assert lines[0] == "l150" and lines[-1] == "l249"
    spool.add("late")  # one more drop while the batch is in flight
    spool.commit(mark)  # only the shipped lines are forgotten
    assert drain(spool) == [["late"]] and spool.dropped == 151


def test_the_spool_is_bounded_in_bytes_too() -> None:
    spool = LogSpool(LogLimits(), max_lines=10**6, max_bytes=100_000)
    for _ in range(100):
        spool.add("y" * 4000)
    assert len(spool) <= 25 and spool.dropped >= 75


def test_a_gigantic_line_is_cut_while_read_and_kept_whole_on_disk() -> None:
    huge = b"z" * (5 * READ_LINE_BYTES + 7)
    pipe = io.BytesIO(b"first\n" + huge + b"\nlast")
    local = io.BytesIO()
    seen: list[str] = []
    _copy_lines(pipe, local, seen.append, lambda err: None)
    assert local.getvalue() == pipe.getvalue()
    assert seen[0] == "first" and seen[2] == "last"
    assert seen[1].startswith("z" * READ_LINE_BYTES) and seen[1].endswith("bytes cut]")
    assert len(seen[1]) < READ_LINE_BYTES + 100


def test_limits_follow_what_the_coordinator_says_it_accepts() -> None:
    assert LogLimits.from_limits(None) == LogLimits()
    told = {"max_log_lines": 500, "max_log_line_chars": 100, "max_error_chars": 1000}
    limits = LogLimits.from_limits({**told, "max_json_bytes": 1 << 20})
    assert (limits.max_lines, limits.max_line_chars, limits.max_error_chars) == (500, 100, 1000)
    assert limits.max_batch_bytes == (1 << 20) // 4
    # A coordinator that accepts more does not make the worker send more than its defaults.
    assert LogLimits.from_limits({"max_log_lines": 10**9}).max_lines == 10_000


def test_the_coordinator_tells_workers_its_limits() -> None:
    from trainfleet.coordinator.routes_worker import WORKER_LIMITS

    assert LogLimits.from_limits(WORKER_LIMITS) == LogLimits()
