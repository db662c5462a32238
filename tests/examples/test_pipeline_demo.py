"""The pipeline walkthrough (examples/pipeline_demo.py, `make pipeline-demo`) runs end to end
on live processes: the teacher trains, the pipeline completes with every batch in exactly one
student, each student beats its CE-only baseline, and no process it started outlives it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "pipeline_demo.py"

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
def test_pipeline_demo_distills_two_students_and_leaves_nothing_running(tmp_path: Path) -> None:
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
    # What the CLI showed: the listing, then the pipeline's own counts.
    assert "$ trainfleet pipelines" in out and "$ trainfleet pipeline show distill" in out
    assert "counts: produced 128, in_flight 0, consumed 128, committed 128, released 128" in out
    assert "ok      pipeline completed: completed" in out
    assert "ok      every batch trained exactly one student, once: " in out
    beats = re.findall(
        r"ok      distill\.consumer(\d) beats its CE-only baseline at (\d+) steps: held-out"
        r" ([\d.]+) nats/byte with the teacher vs ([\d.]+) without",
        out,
    )
    assert sorted(b[0] for b in beats) == ["0", "1"], out[-4000:]
    assert sum(int(b[1]) for b in beats) == 128
    assert all(float(kd) < float(ce) for _, _, kd, ce in beats)
    assert "DIFFERS" not in out and "the students learned more from the teacher" in out
    assert processes_naming(str(state)) == []
