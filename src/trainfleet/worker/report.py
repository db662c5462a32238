"""The outcome of every request a worker makes, in one place.

Every report (claim, heartbeat, log lines, upload, complete, fail) ends in exactly one of four
outcomes (DESIGN.md, "Failure model"):

- ``accepted``: the coordinator took it;
- ``fenced``: 409 ``stale_epoch``, the claim was written off: drop the attempt quietly;
- ``refused``: any other 4xx: fail the attempt with the reason (never exit the daemon);
- ``unreachable``: connection refused, timeout or 5xx: retry with jittered exponential
  backoff, waiting on the daemon's stop event so that SIGTERM interrupts the wait at once.

``Reporter.send`` is the only retry loop of the worker; call sites only decide what each
outcome means for them. ``cut_text`` cuts free text (an error, a log line) to what the
coordinator accepts, at the source.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Generic, Literal, TypeVar

from trainfleet.errors import ApiError, CoordinatorUnavailable, StaleEpoch

log = logging.getLogger(__name__)
T = TypeVar("T")

ReportOutcome = Literal["accepted", "fenced", "refused", "unreachable"]
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
_CUT_MARK = "… [{n} chars cut]"


@dataclass(frozen=True)
class Reply(Generic[T]):
    """What became of one report: its outcome, the reply on success, the error otherwise."""

    outcome: ReportOutcome
    value: T | None = None
    error: Exception | None = None

    @property
    def accepted(self) -> bool:
        return self.outcome == "accepted"

    @property
    def reason(self) -> str:
        if self.error is None:
            return self.outcome
        return getattr(self.error, "message", None) or str(self.error)


def classify(err: Exception) -> ReportOutcome:
    """The outcome a failed request stands for."""
    if isinstance(err, StaleEpoch):
        return "fenced"
    if isinstance(err, ApiError):
        return "refused"
    if isinstance(err, CoordinatorUnavailable):
        return "unreachable"
    raise err


@dataclass(eq=False)
class Backoff:
    """Jittered exponential waits (x0.8-1.2), capped; a wait ends at once when ``stop`` is set."""

    stop: threading.Event
    initial_s: float = INITIAL_BACKOFF_S
    max_s: float = MAX_BACKOFF_S
    rng: Callable[[float, float], float] = random.uniform
    next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_s = self.initial_s

    def wait(self, limit_s: float | None = None) -> bool:
        """Wait out the next delay (at most ``limit_s``); False when stopped meanwhile."""
        delay_s = min(self.next_s, self.max_s) * self.rng(0.8, 1.2)
        if limit_s is not None:
            delay_s = max(0.0, min(delay_s, limit_s))
        self.next_s = min(self.next_s * 2, self.max_s)
        return not self.stop.wait(delay_s)


@dataclass(eq=False)
class Reporter:
    """Makes reports and turns each into a ``Reply``; retries while the coordinator is away.

    ``stop`` is the daemon's stop event: once set, nothing is retried any more (one last
    try is still made, so a job can be handed back on the way out). Each ``send`` backs off
    with a fresh ``Backoff`` of these settings.
    """

    stop: threading.Event
    _: KW_ONLY
    initial_backoff_s: float = INITIAL_BACKOFF_S
    max_backoff_s: float = MAX_BACKOFF_S
    rng: Callable[[float, float], float] = random.uniform

    def send(
        self,
        what: str,
        call: Callable[[], T],
        *,
        retry: bool = True,
        patience_s: float | None = None,
        give_up: Callable[[], bool] | None = None,
        fatal: tuple[type[Exception], ...] = (),
    ) -> Reply[T]:
        """Call until accepted, fenced or refused; while unreachable, back off and retry.

        Stops retrying when ``retry`` is False, the stop event is set, ``patience_s`` has
        passed, or ``give_up()`` says so; the reply is then ``unreachable``. An error of a
        ``fatal`` type is raised at once, never retried.
        """
        backoff = Backoff(self.stop, self.initial_backoff_s, self.max_backoff_s, self.rng)
        deadline = None if patience_s is None else time.monotonic() + patience_s
        while True:
            try:
                return Reply("accepted", call())
            except fatal:
                raise
            except (ApiError, CoordinatorUnavailable) as err:
                outcome = classify(err)
                if outcome != "unreachable":
                    log.log(
                        logging.INFO if outcome == "fenced" else logging.WARNING,
                        "%s %s: %s",
                        what,
                        outcome,
                        getattr(err, "message", err),
                    )
                    return Reply(outcome, error=err)
                left_s = None if deadline is None else deadline - time.monotonic()
                stopping = self.stop.is_set() or (give_up is not None and give_up())
                if not retry or stopping or (left_s is not None and left_s <= 0):
                    # A caller that does not retry (a heartbeat, a log flush) says it itself.
                    level = logging.WARNING if retry else logging.DEBUG
                    log.log(level, "%s: coordinator unreachable (%s); not retrying", what, err)
                    return Reply("unreachable", error=err)
                log.warning("%s: coordinator unreachable (%s); retrying", what, err)
                if not backoff.wait(left_s):
                    return Reply("unreachable", error=err)


def cut_text(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, saying how much was cut.

    Cuts by characters (never inside a code point) and keeps the start and the end, where a
    traceback's first and last lines are.
    """
    if len(text) <= max_chars:
        return text
    keep = max(0, max_chars - len(_CUT_MARK.format(n=len(text))))
    mark = _CUT_MARK.format(n=len(text) - keep)
    head = keep // 2
    return (text[:head] + mark + text[len(text) - (keep - head) :])[:max_chars]


__all__ = ["Backoff", "Reply", "ReportOutcome", "Reporter", "classify", "cut_text"]
