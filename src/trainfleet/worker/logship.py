"""A job's output lines on their way to the coordinator: a bounded spool, shipped in batches.

The coordinator accepts at most ``max_lines`` lines per request, keeps ``max_line_chars``
characters of each, and refuses a JSON body over its byte limit. Lines are cut at the source
and batched by count and by encoded size, so no batch is ever refused for its size. While the
coordinator is unreachable lines wait in the spool, bounded in lines and bytes; when it is
full the oldest lines are dropped, and counted: the count is reported as a last log line
(``[trainfleet] N log lines dropped``) and in the attempt's result, never silently.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from trainfleet.worker.report import cut_text


@dataclass(frozen=True)
class LogLimits:
    """What the coordinator accepts per log request (``RegisterResponse.limits``)."""

    max_lines: int = 10_000
    max_line_chars: int = 4096
    max_batch_bytes: int = 4 << 20  # well under the coordinator's 16 MiB JSON body limit
    max_error_chars: int = 20_000

    @classmethod
    def from_limits(cls, limits: Mapping[str, int] | None) -> LogLimits:
        """The defaults, tightened by what the coordinator said it accepts."""
        base = cls()
        if not limits:
            return base
        return cls(
            max_lines=min(base.max_lines, limits.get("max_log_lines", base.max_lines)),
            max_line_chars=min(
                base.max_line_chars, limits.get("max_log_line_chars", base.max_line_chars)
            ),
            max_batch_bytes=min(base.max_batch_bytes, limits.get("max_json_bytes", 1 << 62) // 4),
            max_error_chars=min(
                base.max_error_chars, limits.get("max_error_chars", base.max_error_chars)
            ),
        )


def encoded_size(line: str) -> int:
    """Bytes ``line`` takes in a JSON array as httpx encodes it (UTF-8, escapes, a comma)."""
    return len(json.dumps(line, ensure_ascii=False).encode()) + 1


class LogSpool:
    """Lines not yet accepted by the coordinator, oldest first; bounded, drops counted."""

    def __init__(self, limits: LogLimits, max_lines: int = 50_000, max_bytes: int = 16 << 20):
        self.limits = limits
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.dropped = 0  # lines dropped because the spool was full
        self._lines: deque[tuple[int, str, int]] = deque()  # (seq, line, encoded size)
        self._next_seq = 0
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lines)

    def add(self, line: str) -> None:
        line = cut_text(line, self.limits.max_line_chars)
        size = encoded_size(line)
        with self._lock:
            self._lines.append((self._next_seq, line, size))
            self._next_seq += 1
            self._bytes += size
            while len(self._lines) > self.max_lines or self._bytes > self.max_bytes:
                _, _, old = self._lines.popleft()
                self._bytes -= old
                self.dropped += 1

    def batch(self) -> tuple[list[str], int]:
        """The oldest lines that fit one request, and the mark to ``commit`` once accepted."""
        out: list[str] = []
        total, last_seq = 0, -1
        with self._lock:
            for seq, line, size in self._lines:
                if len(out) >= self.limits.max_lines or (
                    out and total + size > self.limits.max_batch_bytes
                ):
                    break
                out.append(line)
                total, last_seq = total + size, seq
        return out, last_seq

    def commit(self, last_seq: int) -> None:
        """Lines up to ``last_seq`` were accepted: forget them (some may be dropped already)."""
        with self._lock:
            while self._lines and self._lines[0][0] <= last_seq:
                _, _, size = self._lines.popleft()
                self._bytes -= size

    def clear(self) -> None:
        with self._lock:
            self._lines.clear()
            self._bytes = 0
