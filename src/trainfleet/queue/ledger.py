"""The shard ledger's rules, independent of the backend that stores it.

A worker that trains on a dataset reports, with its result, the content hash of every shard it
used (``result["metrics"]["data"]["shards"]``, under the dataset's digest). The coordinator
checks them against its own plan of the job's dataset (``queue.shard_plans``), made from the
spec, so the first report is checked like every other:

- a digest other than the job's own spec digest is refused (the job trained on another spec);
- a shard whose hash differs from the plan, a key the plan does not have, or a shard of
  another path than the job's, flags the job;
- a dataset job that reports no shard hashes is flagged;
- where the coordinator could not plan the dataset, the first report of a shard is recorded
  and later ones compared with it (as before), and every such job is flagged ``unverified``;
- a job without a dataset that reports shard hashes is flagged; nothing is recorded for it.

A flagged result is kept, as every accepted result is: flags make it visible, never silent.
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


def reported_digest(result: dict[str, Any]) -> str | None:
    """The dataset digest a result says it trained on, if it says one."""
    metrics = result.get("metrics")
    data = metrics.get("data") if isinstance(metrics, dict) else None
    digest = data.get("digest") if isinstance(data, dict) else None
    return digest if isinstance(digest, str) else None


def _key_path(key: str) -> int | None:
    parts = key.split("/")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def plan_flags(reports: list[ShardReport], expected: dict[str, str], path: int | None) -> list[str]:
    """Flags for ``reports`` judged against the coordinator's plan (key -> sha256)."""
    flags = []
    for report in reports:
        want = expected.get(report.key)
        if want is None:
            flags.append(
                f"shard {report.key} of dataset {report.dataset_digest[:12]} is not in the"
                " coordinator's plan of the spec"
            )
        elif want != report.sha256:
            flags.append(
                f"shard {report.key} of dataset {report.dataset_digest[:12]} has sha256 "
                f"{report.sha256[:16]} here but {want[:16]} in the coordinator's plan of the spec"
            )
        elif path is not None and _key_path(report.key) not in (path, None):
            flags.append(f"shard {report.key} belongs to another path than the job's ({path})")
    return flags


def mismatch_flag(report: ShardReport, recorded_sha256: str, recorded_job: str) -> str:
    """The flag put on a job whose shard hash disagrees with the one recorded first."""
    return (
        f"shard {report.key} of dataset {report.dataset_digest[:12]} has sha256 "
        f"{report.sha256[:16]} here but {recorded_sha256[:16]} in job {recorded_job[:12]}"
        " (first report; the coordinator could not plan this dataset)"
    )
