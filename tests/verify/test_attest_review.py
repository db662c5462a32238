"""Attacks on ``verify.attest`` itself: quotes whose fields a parser could choke on, padding
and case variants, far-future dates, and the simulated key files (mode, wrong kind)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainfleet.cli.main import app
from trainfleet.verify.attest import (
    AttestationMalformed,
    AttestationPolicy,
    AttestationRefused,
    PinnedKeyVerifier,
    Quote,
    SimulatedEnclave,
    b64encode,
    canonical_json,
    keygen,
    load_measurements,
    load_public_key,
)

MEASUREMENT = "ab" * 32
NONCE = "cd" * 32
WORKER_KEY = b64encode(b"k" * 32)
NOW = 1_000_000.0


def encoded(**changes: object) -> str:
    fields: dict[str, object] = {
        "enclave": "simulated",
        "issued_at": NOW,
        "measurement": MEASUREMENT,
        "nonce": NONCE,
        "worker_key": WORKER_KEY,
    }
    fields.update(changes)
    return b64encode(canonical_json(fields))


@pytest.mark.parametrize("issued_at", [10**400, -(10**400), 10**309], ids=["big", "-big", "e309"])
def test_an_issued_at_too_big_for_a_float_is_malformed_not_a_crash(issued_at: int) -> None:
    with pytest.raises(AttestationMalformed, match="issued_at"):
        Quote.decode(encoded(issued_at=issued_at))


def test_deeply_nested_or_oversized_quotes_are_malformed() -> None:
    nested = b"[" * 700 + b"]" * 700
    with pytest.raises(AttestationMalformed):
        Quote.decode(b64encode(nested))
    with pytest.raises(AttestationMalformed, match="at most"):
        Quote.decode("A" * 5000)
    with pytest.raises(AttestationMalformed):
        Quote.decode(encoded(enclave={"a": [[[[1]]]]}))


@pytest.mark.parametrize(
    "changes",
    [
        {"measurement": MEASUREMENT.upper()},
        {"measurement": " " + MEASUREMENT},
        {"measurement": MEASUREMENT + "\n"},
        {"nonce": NONCE.upper()},
        {"issued_at": True},
        {"issued_at": "1000000"},
        {"enclave": "Simulated"},
    ],
)
def test_case_and_whitespace_variants_are_malformed(changes: dict[str, object]) -> None:
    with pytest.raises(AttestationMalformed):
        Quote.decode(encoded(**changes))


def test_a_far_future_quote_is_refused(tmp_path: Path) -> None:
    private, public = keygen(tmp_path)
    enclave = SimulatedEnclave(private)
    verifier = PinnedKeyVerifier([load_public_key(public)], [MEASUREMENT])
    for ahead in (60.0, 1e12):
        quote, sig = enclave.quote(WORKER_KEY, MEASUREMENT, NONCE, now=NOW + ahead)
        with pytest.raises(AttestationRefused) as refused:
            verifier.verify(quote, sig, nonce=NONCE, worker_key=WORKER_KEY, now=NOW)
        assert refused.value.reason == "quote_from_future"


def test_the_signature_covers_the_encoding_so_padding_variants_do_not_verify(
    tmp_path: Path,
) -> None:
    private, public = keygen(tmp_path)
    quote, sig = SimulatedEnclave(private).quote(WORKER_KEY, MEASUREMENT, NONCE, now=NOW)
    verifier = PinnedKeyVerifier([load_public_key(public)], [MEASUREMENT])
    assert verifier.verify(quote, sig, nonce=NONCE, worker_key=WORKER_KEY, now=NOW)
    padded = quote + "=" * (-len(quote) % 4 or 4)
    with pytest.raises(AttestationRefused) as refused:
        verifier.verify(padded, sig, nonce=NONCE, worker_key=WORKER_KEY, now=NOW)
    assert refused.value.reason == "bad_signature"


def test_keygen_writes_the_private_key_0600_and_never_overwrites(tmp_path: Path) -> None:
    private, _ = keygen(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        keygen(tmp_path / "keys")


def test_a_private_key_or_garbage_is_not_a_public_key(tmp_path: Path) -> None:
    private, _ = keygen(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\xff\xfe not pem")
    for path in (private, garbage, tmp_path / "absent.pem", tmp_path):
        with pytest.raises(ValueError, match="not a readable PEM public key"):
            load_public_key(path)


def test_measurement_lines_are_strict(tmp_path: Path) -> None:
    allow = tmp_path / "allow"
    allow.write_text(f"  {MEASUREMENT}  # ok\n\n# comment\n")
    assert load_measurements(allow) == [MEASUREMENT]
    allow.write_text(MEASUREMENT.upper() + "\n")
    with pytest.raises(ValueError, match="not 64 lowercase hex"):
        load_measurements(allow)


@pytest.mark.parametrize("ttl_s", [float("inf"), float("nan"), 0.0, -1.0])
def test_an_attestation_ttl_must_be_finite_and_positive(tmp_path: Path, ttl_s: float) -> None:
    _, public = keygen(tmp_path)
    verifier = PinnedKeyVerifier([load_public_key(public)], [MEASUREMENT])
    with pytest.raises(ValueError, match="ttl"):
        AttestationPolicy(verifier, ttl_s=ttl_s)


def test_serve_refuses_an_infinite_attestation_ttl(tmp_path: Path) -> None:
    _, public = keygen(tmp_path / "keys")
    allow = tmp_path / "allow"
    allow.write_text(MEASUREMENT + "\n")
    args = ["serve", "--state-dir", str(tmp_path / "state"), "--attestation-key", str(public)]
    args += ["--measurements", str(allow), "--attest-ttl-s", "inf"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--attest-ttl-s" in result.output
    assert not (tmp_path / "state").exists()  # refused before anything started
