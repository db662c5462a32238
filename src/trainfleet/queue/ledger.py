"""The shard ledger's rule, independent of the backend that stores it.

A worker that trains on a dataset reports, with its result, the content hash of every shard it
used (``result["metrics"]["data"]["shards"]``, keyed by the dataset's digest). The first report of a
shard is recorded; a later report of the same shard with a different hash means one of the
two workers trained on other bytes than the spec makes (a changed source, a tampered router,
a bug). The result is kept, as every result is, but the job is flagged, never silently passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ShardReport:
    dataset_digest: str
    key: str
    sha256: str


def shard_reports(result: dict[str, Any]) -> list[ShardReport]:
    """The shard hashes a result reports in ``metrics.data`` (none without a dataset)."""
    metrics = result.get("metrics")
    data = metrics.get("data") if isinstance(metrics, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("digest"), str):
        return []
    shards = data.get("shards")
    if not isinstance(shards, list):
        return []
    return [
        ShardReport(data["digest"], s["key"], s["sha256"])
        for s in shards
        if isinstance(s, dict)
        and isinstance(s.get("key"), str)
        and isinstance(s.get("sha256"), str)
    ]


def mismatch_flag(report: ShardReport, recorded_sha256: str, recorded_job: str) -> str:
    """The flag put on a job whose shard hash disagrees with the one recorded first."""
    return (
        f"shard {report.key} of dataset {report.dataset_digest[:12]} has sha256 "
        f"{report.sha256[:16]} here but {recorded_sha256[:16]} in job {recorded_job[:12]}"
    )
