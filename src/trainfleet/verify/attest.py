"""Attestation of the private tier: who may run a ``tier = "private"`` job.

A worker earns the right to claim private work by presenting a *quote*: a statement signed
(Ed25519) by an attestation key the operator pins (``trainfleet serve --attestation-key``),
binding three things:

- the worker's own public key (generated per process; the worker proves it holds the private
  half by signing ``trainfleet-attest:{nonce}``: a quote copied off another worker is useless);
- a *measurement* of the code and config the worker runs (``measure``), checked against the
  operator's allowlist (``--measurements``);
- a fresh nonce the coordinator issued to that worker (single use, 60 s): a quote cannot be
  replayed.

The quote is canonical JSON (sorted keys, no spaces) encoded base64url; the signature is over
exactly those encoded bytes, so nothing is re-serialized before checking. ``Verifier`` is the
seam a hardware TEE's verifier plugs into (an SGX/TDX/SEV quote checked against its vendor's
root); ``PinnedKeyVerifier`` checks quotes signed by pinned Ed25519 keys, and
``SimulatedEnclave`` issues such quotes from a key file for tests and local use. The
simulated enclave proves nothing about the machine: anyone holding its key file can sign any
measurement. It exists so the protocol, the refusals and the tier can be exercised end to end.

The checks run in a fixed order and each refusal names its reason (``AttestationRefused``):
malformed (400), unknown attestation key / bad signature, enclave kind not allowed, nonce
unknown / another worker's / expired / already used (replay), quote too old, worker key
mismatch / bad possession signature, measurement not in the allowlist (403). The nonce checks
need the database, so ``PinnedKeyVerifier`` splits its work: ``open`` (signature and enclave)
runs before the nonce is looked up, ``verify`` (freshness, binding, measurement) after.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import importlib.metadata
import json
import math
import os
import platform
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from trainfleet.errors import BadRequest, Forbidden

__all__ = [
    "DEFAULT_ATTEST_TTL_S",
    "MAX_QUOTE_CHARS",
    "NONCE_TTL_S",
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "SIMULATED",
    "AttestationMalformed",
    "AttestationPolicy",
    "AttestationRefused",
    "PinnedKeyVerifier",
    "Quote",
    "SimulatedEnclave",
    "Verifier",
    "b64decode",
    "b64encode",
    "canonical_json",
    "check_possession",
    "keygen",
    "load_measurements",
    "load_public_key",
    "measure",
    "possession_message",
    "worker_config",
]

NONCE_TTL_S = 60.0  # a nonce is usable this long after it is issued
DEFAULT_ATTEST_TTL_S = 3600.0  # an attestation lasts this long (``serve --attest-ttl-s``)
DEFAULT_MAX_AGE_S = NONCE_TTL_S  # a quote older than this is refused
MAX_CLOCK_SKEW_S = 5.0  # a quote issued this far in the future is still accepted
SIMULATED = "simulated"  # the enclave kind of SimulatedEnclave's quotes
MAX_QUOTE_CHARS = 2048  # an encoded quote: ~300 characters in practice
PRIVATE_KEY_FILE = "simulated-attestation.key"
PUBLIC_KEY_FILE = "simulated-attestation.pub"

HEX64 = re.compile(r"[0-9a-f]{64}")
B64URL = re.compile(r"[A-Za-z0-9_-]*")
ENCLAVE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


class AttestationRefused(Forbidden):
    """A quote or its proof of possession was refused (403). ``reason`` is a short
    machine-readable kind (``bad_signature``, ``replay``, ...); the message says why."""

    code = "attestation_refused"

    def __init__(self, reason: str, message: str):
        super().__init__(message, reason=reason)
        self.reason = reason


class AttestationMalformed(BadRequest):
    """The quote cannot be read: not base64url, not canonical JSON, missing or bad fields."""

    def __init__(self, message: str):
        super().__init__(message, reason="malformed")
        self.reason = "malformed"


def b64encode(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    """Strict base64url (padding optional); ``AttestationMalformed`` naming ``what``."""
    if not isinstance(text, str) or not B64URL.fullmatch(text.rstrip("=")):
        raise AttestationMalformed(f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise AttestationMalformed(f"{what} is not base64url") from None


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, ASCII: one byte string per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Quote:
    """What an enclave signs: the worker's key, its measurement, the coordinator's nonce."""

    worker_key: str  # base64url of the worker's raw 32-byte Ed25519 public key
    measurement: str  # sha256 hex (``measure``)
    nonce: str  # the coordinator's nonce: 64 hex
    issued_at: float  # seconds since the epoch, by the enclave's clock
    enclave: str  # "simulated", or the kind of TEE that signed it

    def encode(self) -> str:
        return b64encode(canonical_json(asdict(self)))

    @classmethod
    def decode(cls, quote_b64: str) -> Quote:
        """Parse an encoded quote; ``AttestationMalformed`` unless it is exactly the
        canonical encoding of a well-formed quote."""
        if not isinstance(quote_b64, str) or len(quote_b64) > MAX_QUOTE_CHARS:
            raise AttestationMalformed(f"the quote must be at most {MAX_QUOTE_CHARS} characters")
        raw = b64decode(quote_b64, "the quote")
        try:
            fields = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AttestationMalformed("the quote is not JSON") from None
        if not isinstance(fields, dict) or set(fields) != set(cls.__dataclass_fields__):
            expected = sorted(cls.__dataclass_fields__)
            raise AttestationMalformed(f"the quote must hold exactly the fields {expected}")
        if canonical_json(fields) != raw:
            raise AttestationMalformed("the quote is not canonical JSON (sorted keys, no spaces)")
        quote = cls(**fields)
        quote._check_fields()
        return quote

    def _check_fields(self) -> None:
        if (
            not isinstance(self.worker_key, str)
            or len(b64decode(self.worker_key, "worker_key")) != 32
        ):
            raise AttestationMalformed("the quote's worker_key is not a raw Ed25519 public key")
        for name in ("measurement", "nonce"):
            value = getattr(self, name)
            if not isinstance(value, str) or not HEX64.fullmatch(value):
                raise AttestationMalformed(f"the quote's {name} is not 64 lowercase hex digits")
        if not _finite_number(self.issued_at):
            raise AttestationMalformed("the quote's issued_at is not a finite number")
        if not isinstance(self.enclave, str) or not ENCLAVE.fullmatch(self.enclave):
            raise AttestationMalformed("the quote's enclave is not a short lowercase name")


def _finite_number(value: object) -> bool:
    """A JSON number a float can hold: an int of 400 digits is not (``OverflowError``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class Verifier(Protocol):
    """Checks quotes of one kind of enclave. ``open`` checks who signed the quote; ``verify``
    checks all of it for one nonce and worker key. A TEE verifier implements both."""

    def open(self, quote_b64: str, signature_b64: str) -> Quote:
        """The quote, if well-formed, signed by a trusted key, from an allowed enclave kind."""
        ...

    def verify(
        self,
        quote_b64: str,
        signature_b64: str,
        *,
        nonce: str,
        worker_key: str,
        now: float,
        possession: str | None = None,
    ) -> Quote:
        """``open``, then: the quote carries ``nonce``, is fresh at ``now``, binds
        ``worker_key`` (and ``possession`` signs the nonce with it, when given), and its
        measurement is allowed. Raises ``AttestationRefused``."""
        ...


class PinnedKeyVerifier:
    """Quotes signed by one of the operator's pinned Ed25519 attestation keys."""

    def __init__(
        self,
        keys: Iterable[Ed25519PublicKey],
        measurements: Iterable[str],
        *,
        enclaves: Iterable[str] = (SIMULATED,),
        max_age_s: float = DEFAULT_MAX_AGE_S,
    ):
        self.keys = list(keys)
        self.measurements = sorted(set(measurements))
        self.enclaves = frozenset(enclaves)
        self.max_age_s = max_age_s
        for m in self.measurements:
            if not HEX64.fullmatch(m):
                raise ValueError(f"measurement {m[:80]!r} is not 64 lowercase hex digits")

    def open(self, quote_b64: str, signature_b64: str) -> Quote:
        quote = Quote.decode(quote_b64)
        signature = b64decode(signature_b64, "the signature")
        if len(signature) != 64:
            raise AttestationMalformed("the signature is not 64 bytes (Ed25519)")
        if not self.keys:
            raise AttestationRefused(
                "no_attestation_key", "this coordinator pins no attestation key"
            )
        if not any(_verifies(key, signature, quote_b64.encode()) for key in self.keys):
            raise AttestationRefused(
                "bad_signature",
                "the quote is not signed by any pinned attestation key (unknown key or bad"
                " signature)",
            )
        if quote.enclave not in self.enclaves:
            raise AttestationRefused(
                "enclave_not_allowed",
                f"enclave kind {quote.enclave!r} is not allowed here"
                f" (allowed: {sorted(self.enclaves)})",
            )
        return quote

    def verify(
        self,
        quote_b64: str,
        signature_b64: str,
        *,
        nonce: str,
        worker_key: str,
        now: float,
        possession: str | None = None,
    ) -> Quote:
        quote = self.open(quote_b64, signature_b64)
        if not hmac.compare_digest(quote.nonce.encode(), nonce.encode()):
            raise AttestationRefused("nonce_mismatch", "the quote carries another nonce")
        age_s = now - quote.issued_at
        if age_s > self.max_age_s:
            raise AttestationRefused(
                "quote_too_old",
                f"the quote was issued {age_s:.0f}s ago, over the {self.max_age_s:g}s limit",
            )
        if age_s < -MAX_CLOCK_SKEW_S:
            raise AttestationRefused(
                "quote_from_future", f"the quote is dated {-age_s:.0f}s in the future"
            )
        if not hmac.compare_digest(quote.worker_key.encode(), worker_key.encode()):
            raise AttestationRefused(
                "worker_key_mismatch", "the quote binds another worker key than the one presented"
            )
        if possession is not None:
            check_possession(worker_key, nonce, possession)
        # Every entry is compared, in constant time each: no early exit on a match.
        allowed = False
        for m in self.measurements:
            allowed |= hmac.compare_digest(m.encode(), quote.measurement.encode())
        if not allowed:
            raise AttestationRefused(
                "measurement_not_allowed",
                f"measurement {quote.measurement} is not in this coordinator's allowlist",
            )
        return quote


@dataclass(frozen=True)
class AttestationPolicy:
    """What a coordinator checks attestations with (``serve --attestation-key``)."""

    verifier: Verifier
    ttl_s: float = DEFAULT_ATTEST_TTL_S  # an accepted attestation lasts this long
    nonce_ttl_s: float = NONCE_TTL_S

    def __post_init__(self) -> None:
        # An infinite ttl would attest a worker forever (and its reply is not JSON).
        for name in ("ttl_s", "nonce_ttl_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"the attestation {name} must be a positive number, not {value}")


def _verifies(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def possession_message(nonce: str) -> bytes:
    """What a worker signs with its own key to prove it holds it."""
    return f"trainfleet-attest:{nonce}".encode()


def check_possession(worker_key: str, nonce: str, possession_b64: str) -> None:
    """``possession_b64`` is the worker key's signature of ``possession_message(nonce)``."""
    raw = b64decode(worker_key, "worker_key")
    signature = b64decode(possession_b64, "the possession signature")
    if len(raw) != 32 or len(signature) != 64:
        raise AttestationMalformed("worker_key or the possession signature has the wrong size")
    key = Ed25519PublicKey.from_public_bytes(raw)
    if not _verifies(key, signature, possession_message(nonce)):
        raise AttestationRefused(
            "bad_possession",
            "the possession signature does not verify: the worker does not hold the quoted key",
        )


class SimulatedEnclave:
    """Issues quotes signed by an attestation key read from a file. SIMULATED: it attests
    nothing about the hardware; whoever holds the key file can sign any measurement."""

    kind = SIMULATED

    def __init__(self, key_file: Path):
        self.key = load_private_key(key_file)

    def quote(
        self, worker_key: str, measurement: str, nonce: str, *, now: float
    ) -> tuple[str, str]:
        """``(quote_b64, signature_b64)`` for a worker key, measurement and nonce."""
        quote = Quote(worker_key, measurement, nonce, now, self.kind).encode()
        return quote, b64encode(self.key.sign(quote.encode()))


def keygen(directory: Path) -> tuple[Path, Path]:
    """Write a new SIMULATED attestation key pair into ``directory``: the private key (mode
    0600, given to ``join --enclave simulated:FILE``) and the public key (given to ``serve
    --attestation-key``). Refuses to overwrite an existing private key."""
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a readable PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A pinned attestation key from a PEM file (``serve --attestation-key``)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def load_measurements(path: Path) -> list[str]:
    """The allowlist file: one sha256 hex per line; blank lines and ``#`` comments skipped."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not HEX64.fullmatch(text):
            raise ValueError(f"{path}:{number}: {text[:80]!r} is not 64 lowercase hex digits")
        out.append(text)
    return out


def worker_config() -> dict[str, str]:
    """The part of a worker's configuration its measurement covers: the Python minor
    version, the torch and trainfleet versions (read from the installed distributions,
    without importing torch)."""
    return {
        "python": ".".join(platform.python_version_tuple()[:2]),
        "torch": _version("torch"),
        "trainfleet": _version("trainfleet"),
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def measure(config: Mapping[str, Any], package: Path | None = None) -> str:
    """The measurement of this install: sha256 hex over, in order,

    1. for every ``.py`` file under the installed ``trainfleet`` package (``package``; by
       default the directory ``trainfleet/__init__.py`` is in), sorted by its path relative
       to the package in POSIX form: the line ``"{relative path}\\0{sha256 hex of its
       bytes}\\n"``;
    2. ``b"config\\0"`` then the canonical JSON (sorted keys, no spaces) of ``config``
       (``worker_config()`` for a worker).

    ``__pycache__`` and non-Python files are not measured. The same source tree and config
    give the same measurement on every machine; one changed byte of code changes it.
    """
    if package is None:
        import trainfleet

        package = Path(trainfleet.__file__).resolve().parent
    digest = hashlib.sha256()
    files = sorted(
        (p.relative_to(package).as_posix(), p)
        for p in package.rglob("*.py")
        if "__pycache__" not in p.parts and p.is_file()
    )
    for relative, path in files:
        file_sha = hashlib.sha256(path.read_bytes()).hexdigest()
        digest.update(f"{relative}\0{file_sha}\n".encode())
    digest.update(b"config\0" + canonical_json(dict(config)))
    return digest.hexdigest()
