"""What every benchmark's results JSON shares (STYLE.md, "Benchmarks: one convention"): the
environment it ran in, and where and how the file is written."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def environment(**extra: Any) -> dict[str, Any]:
    """Cores, Python and torch versions and the commit measured, then ``extra`` (other
    versions, conditions such as the page cache)."""
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "commit": commit(),
        **extra,
    }


def package_version(package: str) -> str:
    """An installed distribution's version, read without importing it; "absent" if none."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def commit() -> str:
    """This checkout's short commit hash; "unknown" outside git."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(result: dict[str, Any], out: Path) -> None:
    """Write ``result`` as indented JSON to ``out``, creating its folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
