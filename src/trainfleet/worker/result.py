"""What a finished job reports: its ``metrics.json``, made safe to send.

JSON as Python reads it allows ``NaN`` and ``Infinity``; the coordinator's JSON does not. A
non-finite number is reported as ``null`` and its key path is listed in the result's
``non_finite`` field, so a diverged run still reports its artifact and its other metrics.
A ``metrics.json`` that is not a JSON object (a list, a number, invalid JSON) is a broken
contract between the job and trainfleet: the attempt fails with the reason, not retried
(the same code would write the same file again).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MAX_METRICS_BYTES = 1 << 20


class MetricsError(ValueError):
    """``metrics.json`` cannot be reported: the message says why."""


def read_metrics(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The job's metrics (``{}`` when it wrote none) and the key paths of non-finite values."""
    if not path.exists():
        return {}, []
    size = path.stat().st_size
    if size > MAX_METRICS_BYTES:
        raise MetricsError(f"metrics.json is {size} bytes; at most {MAX_METRICS_BYTES} allowed")
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise MetricsError(f"metrics.json is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise MetricsError(
            f"metrics.json must hold a JSON object of named metrics, not a {type(value).__name__}"
        )
    non_finite: list[str] = []
    return _finite(value, "", non_finite), non_finite


def _finite(value: Any, where: str, non_finite: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        non_finite.append(where)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}" if where else k, non_finite) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v, f"{where}[{i}]", non_finite) for i, v in enumerate(value)]
    return value
