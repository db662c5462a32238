"""Non-finite metrics are reported as null plus a flag; a metrics file that is not a JSON
object is refused with a clear reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainfleet.worker.result import MetricsError, read_metrics


def test_non_finite_values_become_null_and_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text('{"loss": NaN, "acc": 0.5, "curve": [1.0, Infinity], "x": {"y": -Infinity}}')
    metrics, non_finite = read_metrics(path)
    assert metrics == {"loss": None, "acc": 0.5, "curve": [1.0, None], "x": {"y": None}}
    assert non_finite == ["loss", "curve[1]", "x.y"]
    json.dumps(metrics, allow_nan=False)  # what the client will send


def test_no_metrics_file_is_no_metrics(tmp_path: Path) -> None:
    assert read_metrics(tmp_path / "metrics.json") == ({}, [])


@pytest.mark.parametrize(
    ("text", "reason"),
    [("[1, 2]", "not a list"), ("3.5", "not a float"), ("{oops", "not valid JSON")],
)
def test_a_metrics_file_that_is_not_an_object_is_refused(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(text)
    with pytest.raises(MetricsError, match=reason.split()[-1]):
        read_metrics(path)
