"""The attested private tier against live processes: a ``trainfleet serve`` that pins a
SIMULATED attestation key and an allowlist, a worker whose enclave key is not pinned (refused,
keeps taking public work) and one whose is (attested): the ``tier = "private"`` job runs on
the attested one only, and the other never claims it. A replayed quote and a wrong
measurement are refused with their reasons, over real HTTP."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetkit import make_cap
from livefleet import REPO, slow_job, trainfleet_argv
from trainfleet import env
from trainfleet.cli.main import app
from trainfleet.client import Client
from trainfleet.errors import ApiError
from trainfleet.testing.served import ServedFleet
from trainfleet.verify.attest import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, SimulatedEnclave, keygen
from trainfleet.worker.attest import Attester

pytestmark = pytest.mark.slow


def trainfleet(*args: str) -> str:
    proc = subprocess.run(
        trainfleet_argv(*args),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return proc.stdout + proc.stderr


def refusal(call: Callable[[], object]) -> str:
    """The reason of the 403 that ``call()`` must raise."""
    with pytest.raises(ApiError) as err:
        call()
    assert err.value.status_code == 403, err.value
    return str(err.value.details["reason"])


def test_a_private_job_runs_only_on_the_attested_worker(tmp_path: Path) -> None:
    pinned, rogue = tmp_path / "pinned", tmp_path / "rogue"
    out = trainfleet("attest", "keygen", str(pinned))
    assert "simulated" in out.lower() and (pinned / PUBLIC_KEY_FILE).is_file()
    keygen(rogue)  # another simulated key: not pinned
    measurement = trainfleet("attest", "measure").strip()
    assert len(measurement) == 64
    allowed = tmp_path / "allowed.txt"
    allowed.write_text(f"# this checkout\n{measurement}\n")
    serve_args = (
        "--attestation-key",
        str(pinned / PUBLIC_KEY_FILE),
        "--measurements",
        str(allowed),
        "--attest-ttl-s",
        "600",
    )
    with ServedFleet(tmp_path, serve_args=serve_args) as fleet:
        fleet.reload(slow_job("secret", 0.1, tier="private", priority=10) + slow_job("open", 0.1))
        # Not pinned: refused with its reason, and it goes on with public work.
        plain = fleet.start_worker("cpu-a", "--enclave", f"simulated:{rogue / PRIVATE_KEY_FILE}")
        assert fleet.wait_state("open", {"completed"}, timeout_s=60)["host"] == "cpu-a"
        assert "attestation refused (bad_signature)" in plain.log_text()
        assert fleet.job("secret")["job"]["state"] == "pending"
        trusted = fleet.start_worker("cpu-b", "--enclave", f"simulated:{pinned / PRIVATE_KEY_FILE}")
        assert fleet.wait_state("secret", {"completed"}, timeout_s=60)["host"] == "cpu-b"
        assert "attested by the simulated enclave" in trusted.log_text()
        plain_ids = {w["id"] for w in fleet.operator.workers() if w["host"] == "cpu-a"}
        assert plain_ids
        events = fleet.job("secret")["events"]
        assert any(e["kind"] == "claimed" for e in events)
        assert not any(e["worker_id"] in plain_ids for e in events)  # never reached it

        # A wrong measurement and a replayed quote, presented by a registered worker.
        with Client(fleet.url, fleet.worker_token("cpu-c")) as joining:
            reg = joining.register(make_cap("cpu-c").model_dump(mode="json"))
        with Client(fleet.url, reg["token"]) as me:
            enclave = SimulatedEnclave(pinned / PRIVATE_KEY_FILE)
            wrong = Attester(enclave, measurement="ee" * 32)
            assert not wrong.attest(me)
            assert wrong.refusal == "measurement_not_allowed"
            honest = Attester(enclave, measurement=measurement)
            body = honest.body(me.request("POST", "/v1/attest/nonce")["nonce"])
            accepted = me.request("POST", "/v1/attest", json=body)
            assert accepted["measurement"] == measurement
            assert refusal(lambda: me.request("POST", "/v1/attest", json=body)) == "replay"


def test_attestation_flags_are_checked_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clear messages, exit 2, no traceback: a key without an allowlist, an unreadable key,
    an enclave that does not exist, a key pair that would be overwritten (in-process)."""
    monkeypatch.setenv(env.JOIN_TOKEN, "t")
    keygen(tmp_path)
    cases = [
        (["serve", "--attestation-key", str(tmp_path / PUBLIC_KEY_FILE)], "needs --measurements"),
        (
            ["serve", "--attestation-key", str(tmp_path / "nope.pem"), "--measurements", "x"],
            "not a readable PEM public key",
        ),
        (["join", "http://127.0.0.1:9", "--enclave", "sgx:whatever"], "simulated:KEYFILE"),
        (["attest", "keygen", str(tmp_path)], "not overwritten"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
