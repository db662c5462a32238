"""Notice wall-clock steps between reaper passes, so a step cannot requeue running jobs.

Leases are wall-clock times in the queue (``heartbeat_at``), because they must survive a
restart. A wall clock can step, though (an NTP correction, an operator's ``date -s``, a VM
resumed from a snapshot), and a step forward of more than the heartbeat timeout would make
every running job look silent at once. So each reaper pass compares how far the wall clock
moved since the previous pass with how far the monotonic clock moved; the difference is the
step. The rule:

- A step of at most ``STEP_TOLERANCE_S`` either way is ignored (NTP slews, scheduling jitter).
  Slow drift never adds up to a step: each pass compares with the previous pass only.
- After a step beyond it, in either direction, every active lease restarts at the new wall
  time (``queue.renew_leases()``), before the pass reaps anything, and a warning is logged.
  A forward step therefore never shortens a lease; the silence before the step is forgiven,
  as a coordinator restart forgives its downtime.
- A backward step must not lengthen leases by its size (a step back of a day would keep a
  dead worker's job claimed for a day). Renewing bounds it: each lease then ends one heartbeat
  timeout after the step was noticed, so a lost job is still requeued within
  ``heartbeat_timeout_s + reap_interval_s`` of the step, and no lease is lengthened by more
  than one heartbeat timeout.
- Linux's monotonic clock stops while the machine is suspended, so a coordinator host waking
  from sleep is seen as a forward step and treated like a restart.

Not adjusted: the per-job time limit's backstop on the coordinator (``claimed_at + timeout_s +
heartbeat_timeout_s``) stays in wall time, so a step moves it by the step's size; workers
enforce ``timeout_s`` themselves on their monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Larger than any NTP slew between two passes, smaller than any heartbeat timeout worth using.
STEP_TOLERANCE_S = 1.0


class ClockSteps:
    """Measures wall-clock steps: once per reaper pass, :meth:`step_s`, then, once the step
    is dealt with (leases renewed), :meth:`settle`. A pass that fails before settling leaves
    the step to be measured again by the next pass."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        tolerance_s: float = STEP_TOLERANCE_S,
    ):
        self._wall = wall
        self._monotonic = monotonic
        self.tolerance_s = tolerance_s
        self._settled: tuple[float, float] | None = None
        self._measured: tuple[float, float] | None = None

    def step_s(self) -> float:
        """Seconds the wall clock stepped since the last settled measurement, beyond the
        monotonic time that passed: positive forward, negative backward; 0.0 within the
        tolerance and on the first call."""
        self._measured = now = (self._wall(), self._monotonic())
        if self._settled is None:
            self._settled = now
            return 0.0
        wall_s, mono_s = now[0] - self._settled[0], now[1] - self._settled[1]
        step_s = wall_s - mono_s
        return step_s if abs(step_s) > self.tolerance_s else 0.0

    def settle(self) -> None:
        """The step just measured has been dealt with: measure the next one from here."""
        if self._measured is not None:
            self._settled = self._measured
