"""Attestation quotes (``verify.attest``): encoding, each refusal in its order, the
measurement, the simulated enclave; and the queue's nonces on every backend."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetkit import FakeClock, make_cap
from trainfleet.errors import Unauthorized
from trainfleet.queue import JobQueue
from trainfleet.verify.attest import (
    AttestationMalformed,
    AttestationRefused,
    PinnedKeyVerifier,
    Quote,
    SimulatedEnclave,
    b64encode,
    canonical_json,
    check_possession,
    keygen,
    load_measurements,
    load_public_key,
    measure,
    possession_message,
)

NOW = 1_000_000.0
MEASUREMENT = "ab" * 32
NONCE = "cd" * 32


class Party:
    """A simulated enclave (its key pair on disk) and a worker key."""

    def __init__(self, directory: Path):
        self.private_file, self.public_file = keygen(directory)
        self.enclave = SimulatedEnclave(self.private_file)
        self.worker = Ed25519PrivateKey.generate()
        raw = self.worker.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.worker_key = b64encode(raw)

    def verifier(self, **kw: object) -> PinnedKeyVerifier:
        return PinnedKeyVerifier([load_public_key(self.public_file)], [MEASUREMENT], **kw)  # type: ignore[arg-type]

    def quote(self, *, nonce: str = NONCE, measurement: str = MEASUREMENT, now: float = NOW):
        return self.enclave.quote(self.worker_key, measurement, nonce, now=now)

    def possession(self, nonce: str = NONCE) -> str:
        return b64encode(self.worker.sign(possession_message(nonce)))


@pytest.fixture
def party(tmp_path: Path) -> Party:
    return Party(tmp_path / "keys")


def reason(err: pytest.ExceptionInfo[AttestationRefused]) -> str:
    return err.value.reason


def test_a_good_quote_verifies_and_round_trips(party: Party) -> None:
    quote_b64, sig = party.quote()
    quote = party.verifier().verify(
        quote_b64,
        sig,
        nonce=NONCE,
        worker_key=party.worker_key,
        now=NOW + 1,
        possession=party.possession(),
    )
    assert quote == Quote(party.worker_key, MEASUREMENT, NONCE, NOW, "simulated")
    assert Quote.decode(quote.encode()) == quote
    raw = base64.urlsafe_b64decode(quote_b64 + "=" * (-len(quote_b64) % 4))
    assert raw == canonical_json(json.loads(raw)) and b" " not in raw  # canonical bytes


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(
    tmp_path: Path,
) -> None:
    private, public = keygen(tmp_path)
    assert "simulated" in private.name and "simulated" in public.name
    assert private.stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        keygen(tmp_path)


@pytest.mark.parametrize(
    "quote_b64",
    [
        "!!!",  # not base64url
        b64encode(b"not json"),
        b64encode(b"[1, 2]"),
        b64encode(json.dumps({"worker_key": "x"}).encode()),  # fields missing
    ],
)
def test_malformed_quotes_are_a_400(party: Party, quote_b64: str) -> None:
    _, sig = party.quote()
    with pytest.raises(AttestationMalformed) as err:
        party.verifier().open(quote_b64, sig)
    assert err.value.status_code == 400


def test_a_non_canonical_encoding_of_a_signed_quote_is_malformed(party: Party) -> None:
    quote_b64, _ = party.quote()
    fields = json.loads(base64.urlsafe_b64decode(quote_b64 + "=="))
    spaced = b64encode(json.dumps(fields, indent=1).encode())
    with pytest.raises(AttestationMalformed, match="canonical"):
        party.verifier().open(spaced, b64encode(party.enclave.key.sign(spaced.encode())))


def test_field_checks_refuse_a_non_finite_time_and_a_short_key(party: Party) -> None:
    bad = {
        "worker_key": party.worker_key,
        "measurement": MEASUREMENT,
        "nonce": NONCE,
        "issued_at": NOW,
        "enclave": "simulated",
    }
    for field, value in (
        ("issued_at", float("nan")),
        ("worker_key", b64encode(b"short")),
        ("measurement", "AB" * 32),
        ("enclave", "Not Ok"),
    ):
        encoded = b64encode(canonical_json({**bad, field: value}))
        with pytest.raises(AttestationMalformed):
            Quote.decode(encoded)


def test_an_unknown_key_or_a_tampered_quote_is_refused(party: Party, tmp_path: Path) -> None:
    other = Party(tmp_path / "other")
    quote_b64, sig = other.quote()
    with pytest.raises(AttestationRefused) as err:
        party.verifier().open(quote_b64, sig)
    assert reason(err) == "bad_signature" and err.value.status_code == 403
    quote_b64, sig = party.quote()
    tampered = Quote.decode(quote_b64)
    forged = Quote(tampered.worker_key, "ee" * 32, tampered.nonce, NOW, "simulated").encode()
    with pytest.raises(AttestationRefused) as err:
        party.verifier().open(forged, sig)
    assert reason(err) == "bad_signature"


def test_no_pinned_key_refuses_everything(party: Party) -> None:
    quote_b64, sig = party.quote()
    with pytest.raises(AttestationRefused) as err:
        PinnedKeyVerifier([], [MEASUREMENT]).open(quote_b64, sig)
    assert reason(err) == "no_attestation_key"


def test_an_enclave_kind_not_allowed_is_refused_after_the_signature(party: Party) -> None:
    quote = Quote(party.worker_key, MEASUREMENT, NONCE, NOW, "sgx").encode()
    sig = b64encode(party.enclave.key.sign(quote.encode()))
    with pytest.raises(AttestationRefused) as err:
        party.verifier().open(quote, sig)
    assert reason(err) == "enclave_not_allowed" and "sgx" in err.value.message
    assert party.verifier(enclaves=("sgx",)).open(quote, sig).enclave == "sgx"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"nonce": "ef" * 32}, "nonce_mismatch"),
        ({"now": NOW + 61}, "quote_too_old"),
        ({"now": NOW - 60}, "quote_from_future"),
        ({"worker_key": b64encode(b"\x01" * 32)}, "worker_key_mismatch"),
        ({"possession": b64encode(b"\x00" * 64)}, "bad_possession"),
        ({"measurement": "ee" * 32}, "measurement_not_allowed"),
    ],
)
def test_each_binding_check_refuses_with_its_reason(
    party: Party, change: dict[str, str | float], expected: str
) -> None:
    quote_b64, sig = party.quote(measurement=str(change.get("measurement", MEASUREMENT)))
    args: dict[str, object] = {
        "nonce": NONCE,
        "worker_key": party.worker_key,
        "now": NOW + 1,
        "possession": party.possession(),
    }
    args.update({k: v for k, v in change.items() if k != "measurement"})
    with pytest.raises(AttestationRefused) as err:
        party.verifier().verify(quote_b64, sig, **args)  # type: ignore[arg-type]
    assert reason(err) == expected


def test_the_order_of_checks_reports_the_first_failure(party: Party, tmp_path: Path) -> None:
    """Wrong key AND old AND unlisted measurement: the signature is what is reported; a
    genuine but old quote with an unlisted measurement: its age."""
    other = Party(tmp_path / "other")
    quote_b64, sig = other.quote(measurement="ee" * 32)
    with pytest.raises(AttestationRefused) as err:
        party.verifier().verify(quote_b64, sig, nonce=NONCE, worker_key="x", now=NOW + 999)
    assert reason(err) == "bad_signature"
    quote_b64, sig = party.quote(measurement="ee" * 32)
    with pytest.raises(AttestationRefused) as err:
        party.verifier().verify(
            quote_b64, sig, nonce=NONCE, worker_key=party.worker_key, now=NOW + 999
        )
    assert reason(err) == "quote_too_old"


def test_possession_binds_the_nonce(party: Party) -> None:
    check_possession(party.worker_key, NONCE, party.possession())
    with pytest.raises(AttestationRefused):
        check_possession(party.worker_key, "ef" * 32, party.possession())


def test_measurement_covers_every_source_file_and_the_config(tmp_path: Path) -> None:
    pkg = tmp_path / "trainfleet"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "sub" / "mod.py").write_text("y = 2\n")
    (pkg / "data.txt").write_text("not measured")
    config = {"python": "3.11", "torch": "2.3.0"}
    first = measure(config, pkg)
    assert first == measure(dict(reversed(config.items())), pkg)  # key order is irrelevant
    assert len(first) == 64 and int(first, 16) >= 0
    (pkg / "data.txt").write_text("changed")
    assert measure(config, pkg) == first  # only .py files count
    (pkg / "sub" / "mod.py").write_text("y = 3\n")
    changed = measure(config, pkg)
    assert changed != first
    assert measure({**config, "torch": "2.4.0"}, pkg) != changed
    (pkg / "sub" / "mod.py").rename(pkg / "sub" / "other.py")  # the path counts too
    assert measure(config, pkg) != changed


def test_measure_of_this_install_is_stable() -> None:
    assert measure({"a": 1}) == measure({"a": 1})


def test_the_allowlist_file_skips_comments_and_refuses_junk(tmp_path: Path) -> None:
    path = tmp_path / "m.txt"
    path.write_text(f"# allowed\n{MEASUREMENT}  # this build\n\n")
    assert load_measurements(path) == [MEASUREMENT]
    path.write_text("not-a-sha\n")
    with pytest.raises(ValueError, match=r"m\.txt:1"):
        load_measurements(path)


# the queue's nonces, on every backend -----------------------------------------------------
def test_a_nonce_is_single_use_and_bound_to_its_worker(queue: JobQueue, clock: FakeClock) -> None:
    a, _ = queue.register_worker(make_cap("a"))
    b, _ = queue.register_worker(make_cap("b"))
    nonce = queue.attest_nonce(a.id, 60.0)
    assert len(nonce) == 64 and int(nonce, 16) >= 0
    with pytest.raises(AttestationRefused) as err:
        queue.check_attest_nonce(b.id, nonce)
    assert reason(err) == "nonce_other_worker"
    with pytest.raises(AttestationRefused) as err:
        queue.attest_worker(b.id, nonce, MEASUREMENT, clock() + 100)
    assert reason(err) == "nonce_other_worker"
    with pytest.raises(AttestationRefused) as err:
        queue.check_attest_nonce(a.id, "00" * 32)
    assert reason(err) == "nonce_unknown"
    queue.check_attest_nonce(a.id, nonce)
    queue.attest_worker(a.id, nonce, MEASUREMENT, clock() + 100)
    with pytest.raises(AttestationRefused) as err:
        queue.attest_worker(a.id, nonce, MEASUREMENT, clock() + 100)
    assert reason(err) == "replay"
    with pytest.raises(AttestationRefused) as err:
        queue.check_attest_nonce(a.id, nonce)
    assert reason(err) == "replay"


def test_a_nonce_expires_and_a_new_one_replaces_the_unused(
    queue: JobQueue, clock: FakeClock
) -> None:
    a, _ = queue.register_worker(make_cap("a"))
    first = queue.attest_nonce(a.id, 60.0)
    clock.advance(61)
    with pytest.raises(AttestationRefused) as err:
        queue.check_attest_nonce(a.id, first)
    assert reason(err) == "nonce_expired"
    second = queue.attest_nonce(a.id, 60.0)
    with pytest.raises(AttestationRefused) as err:
        queue.check_attest_nonce(a.id, first)
    assert reason(err) == "nonce_unknown"  # replaced: a worker attests one at a time
    queue.check_attest_nonce(a.id, second)


def test_a_revoked_worker_cannot_be_attested(queue: JobQueue, clock: FakeClock) -> None:
    a, _ = queue.register_worker(make_cap("a"))
    nonce = queue.attest_nonce(a.id, 60.0)
    queue.revoke_worker(a.id)
    with pytest.raises(Unauthorized):
        queue.attest_worker(a.id, nonce, MEASUREMENT, clock() + 100)
    queue.check_attest_nonce(a.id, nonce)  # the refused attestation consumed nothing
