"""End to end, the training market on live processes: a ``trainfleet serve`` coordinator,
real ``trainfleet join`` workers on distinct enrolled hosts refereeing with ``python -m
trainfleet.verify.referee``, and the ``trainfleet market`` CLI of an operator and of a
submitting host.

One competition (a tiny GPT family, 3 referees needing 2, 32 windows each) sees an inflated
claim (refused, paid nothing), an honest improvement (paid once, the frontier moves), a free
rider resubmitting it (a duplicate: no referee runs, paid nothing), and a coordinator SIGKILLed
in the middle of a panel: after the restart the panel finishes, and nothing is paid twice.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from livefleet import wait_until
from tinymarket import baseline, competition_toml, heldout_mean, save, trained
from trainfleet import env
from trainfleet.testing import ServedFleet, trainfleet_argv

pytestmark = pytest.mark.slow

REFEREES = ("ref-a", "ref-b", "ref-c")
PRODUCER = "alice"  # an enrolled host that submits; its own worker never referees its models


def submit(fleet: ServedFleet, model: Path, claim: float, *extra: str) -> tuple[int, Any]:
    """``trainfleet market submit`` as host alice (her join token); exit code and JSON."""
    args = ["market", "submit", str(model), "--claim", f"{claim:.6f}"]
    proc = subprocess.run(
        trainfleet_argv(*args, "--competition", "tiny-lm", "--json", *extra),
        capture_output=True,
        text=True,
        env={**os.environ, env.URL: fleet.url, env.TOKEN: fleet.worker_token(PRODUCER)},
        cwd=fleet.tmp,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def ledger(fleet: ServedFleet) -> dict[str, Any]:
    result: dict[str, Any] = fleet.operator.market_ledger("tiny-lm")
    return result


def test_a_live_market_pays_once_refuses_cheats_and_survives_a_restart(tmp_path: Path) -> None:
    base = save(baseline(), tmp_path / "baseline.safetensors")
    lesser = trained(30)
    inflated_model = save(lesser, tmp_path / "inflated.safetensors")
    honest = trained(60)
    honest_model = save(honest, tmp_path / "honest.safetensors")
    (tmp_path / "tiny-lm.toml").write_text(competition_toml())

    with ServedFleet(tmp_path) as fleet:
        for host in (*REFEREES, PRODUCER):
            fleet.start_worker(host)
        made = fleet.cli(
            "market", "create", str(tmp_path / "tiny-lm.toml"), "--baseline", str(base), check=True
        )
        assert "competition tiny-lm" in made.stdout
        start = fleet.operator.competition("tiny-lm")["competition"]

        # An inflated claim: half a nat better than the model is. Refused, paid nothing.
        code, told = submit(fleet, inflated_model, heldout_mean(lesser) - 0.5, "--wait")
        inflated = told["submission"]
        assert code == 1 and inflated["state"] == "rejected", inflated
        assert "inflated claim" in inflated["verdict"] and inflated["paid"] == 0
        hosts = {r["host"] for r in inflated["reports"]}
        assert len(hosts) == 3 and PRODUCER not in hosts  # three distinct referees, not alice
        assert ledger(fleet)["entries"] == []

        # An honest improvement, submitted without waiting; the coordinator is SIGKILLed once
        # a referee has reported, and the panel finishes after the restart.
        code, told = submit(fleet, honest_model, heldout_mean(honest))
        sid = told["submission"]["id"]
        assert code == 0 and told["submission"]["state"] == "refereeing"
        wait_until(
            lambda: fleet.operator.submission(sid)["submission"]["reports"],
            120,
            "a referee to report",
            interval_s=0.1,
        )
        fleet.kill_coordinator()
        fleet.start_coordinator()
        decided = wait_until(
            lambda: (
                (s := fleet.operator.submission(sid)["submission"])["state"] != "refereeing" and s
            ),
            120,
            "the honest submission to be decided",
        )
        assert decided["state"] == "accepted", decided["verdict"]
        assert decided["paid"] > 0 and len(decided["reports"]) == 3
        assert PRODUCER not in {r["host"] for r in decided["reports"]}

        # A free rider resubmits the paid model: a duplicate, no referee job, nothing paid.
        code, told = submit(fleet, honest_model, heldout_mean(honest), "--wait")
        assert code == 1 and told["submission"]["state"] == "duplicate"
        assert fleet.operator.submission(told["submission"]["id"])["referees"] == []

        # Restarted again: nothing is paid twice, the books balance exactly.
        fleet.kill_coordinator()
        fleet.start_coordinator()
        book = ledger(fleet)
        after = fleet.operator.competition("tiny-lm")["competition"]
        assert [e["submission_id"] for e in book["entries"]] == [sid]
        assert book["balances"] == {PRODUCER: pytest.approx(decided["paid"])}
        assert after["frontier"] == decided["sha256"]
        assert book["total_paid"] == pytest.approx(
            100.0 * (start["baseline_score"] - after["frontier_score"])
        )

        board = fleet.cli("market", "leaderboard", "tiny-lm", check=True).stdout
        assert sid[:12] in board and PRODUCER in board
        books = fleet.cli("market", "ledger", "tiny-lm", check=True).stdout
        assert f"total paid: {book['total_paid']:.4f}" in books
        shown = fleet.cli("market", "show", inflated["id"], check=True).stdout
        assert "rejected: inflated claim" in shown and "ref-a" in shown
