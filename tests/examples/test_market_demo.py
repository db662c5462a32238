"""The market walkthrough (examples/market_demo.py, `make market-demo`) runs end to end on
live processes: an honest claim is paid, an inflated one rejected, a resubmission is a
duplicate, the books balance, and no process it started outlives it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "market_demo.py"

pytestmark = pytest.mark.slow


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if text in argv:
            found.append(argv)
    return found


@pytest.mark.timeout(600)
def test_market_demo_pays_the_honest_claim_only_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    state = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dir", str(state)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        stdin=subprocess.DEVNULL,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-3000:]
    # Each outcome as the CLI printed it, then as the summary checked it with the coordinator.
    assert ": accepted, paid " in out and "certified an improvement" in out
    assert ": rejected: inflated claim: claim " in out
    assert ": duplicate: resubmission of submission " in out
    for line in (
        "ok      honest claim accepted and paid: accepted",
        "ok      inflated claim rejected, paid nothing: rejected, paid 0.0000",
        "ok      resubmission is a duplicate, paid nothing, no referee ran: duplicate",
        "ok      alice's balance = rate x verified improvement: ",
        "the market behaved as expected",
    ):
        assert line in out, out[-6000:]
    assert "DIFFERS" not in out
    assert "total paid: " in out and "leaderboard tiny-lm" in out
    # The referees were the three enrolled referee hosts' workers, never alice's.
    for host in ("ref-a", "ref-b", "ref-c"):
        assert f"({host}): candidate " in out
    assert "(alice): candidate" not in out
    assert processes_naming(str(state)) == []
