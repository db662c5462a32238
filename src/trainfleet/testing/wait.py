"""Wait on a state with a timeout, never a fixed sleep."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["wait_until"]


def wait_until(
    predicate: Callable[[], Any],
    timeout_s: float = 60.0,
    what: str = "condition",
    *,
    interval_s: float = 0.1,
) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; raise
    ``AssertionError`` naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        pause.wait(interval_s)
