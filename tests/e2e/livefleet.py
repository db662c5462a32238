"""End-to-end helpers: thin names over the reusable harness in ``trainfleet.testing``."""

from __future__ import annotations

from pathlib import Path

from trainfleet.testing import LiveFleet, WorkerHandle, kill_tree, wait_until

REPO = Path(__file__).resolve().parents[2]
SLOW_JOB = str(Path(__file__).parent / "scripts" / "slow_job.py")

Fleet = LiveFleet  # the name the end-to-end tests use

__all__ = ["REPO", "SLOW_JOB", "Fleet", "LiveFleet", "WorkerHandle", "kill_tree", "wait_until"]
