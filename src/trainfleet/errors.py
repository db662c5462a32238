"""The trainfleet exception tree.

::

    TrainfleetError                 base of everything we raise on purpose
    ├── ManifestError               a manifest is invalid (names file, job and field)
    │   └── ManifestTooDeep         its tables or arrays nest past the loader's limit
    ├── ApiError                    an HTTP-level error; carries status_code and a JSON body
    │   ├── BadRequest          400 malformed request / failed validation
    │   ├── Unauthorized        401 missing, wrong or revoked token
    │   ├── Forbidden           403 a valid token asking for what it may not (another host)
    │   ├── NotFound            404 no such job / worker / artifact
    │   ├── Conflict            409 state conflict, e.g. the job is not in a state for this
    │   │   └── StaleEpoch      409 the claim's fencing epoch is no longer current
    │   ├── PayloadTooLarge     413 a request body or declared upload is over its limit
    │   ├── IntegrityError      422 uploaded bytes do not match their declared digest / size
    │   └── InsufficientStorage 507 the coordinator's disk is full (retry later)
    ├── CoordinatorUnavailable  the coordinator cannot be reached (client side)
    │   └── UntrustedCertificate  its TLS certificate fails verification: retrying cannot help
    ├── StorageUnavailable      the artifact store cannot be opened (no bucket, no access)
    ├── CorpusTooSmall          a corpus split is shorter than one training window
    ├── SchemaTooNew            the database's schema is newer than this trainfleet knows
    ├── DataError               a dataset spec cannot be materialized as pinned
    │   ├── SourceUnavailable   the source cannot be read here (offline, missing files/extra)
    │   ├── SourceMismatch      the source differs from what the spec pins (version, hash)
    │   ├── ShardMismatch       rebuilt shard bytes differ from the recorded content hash
    │   └── RoutingMismatch     a router does not match a re-fit from its spec (fatal)
    └── FeatureError            a feature-store operation refused (data plane); ``reason``
        ├── SampleGone          get after release / abort / GC (use after free)
        ├── StaleGeneration     the ref's generation is not the key's current one
        ├── HashMismatch        bytes read do not hash to the ref's content hash
        ├── BadRef              the ref's HMAC does not verify (forged / other pipeline)
        ├── FeatureAuthError    missing or wrong pipeline secret (data plane auth)
        ├── Backpressure        put waited wait_s over the high watermark
        └── StoreUnavailable    the store cannot be reached (HTTP connect error, dir gone)

User mistakes (bad manifest, bad flag, bad request) surface as these, and the CLI turns them
into a one-line message and a non-zero exit; the HTTP API turns ``ApiError`` into a JSON body
``{"error": <code>, "message": <text>, ...}`` with its status code.
"""

from __future__ import annotations

from typing import Any


class TrainfleetError(Exception):
    """Base class of every error trainfleet raises on purpose."""


class ManifestError(TrainfleetError):
    """The manifest is invalid. ``problems`` lists each as 'file: where: what'."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


class ManifestTooDeep(ManifestError):
    """The manifest's tables or arrays nest deeper than the loader allows."""


class ApiError(TrainfleetError):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, **details: Any):
        self.message = message
        self.details = details
        super().__init__(message)

    def to_json(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details}


class BadRequest(ApiError):
    status_code = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status_code = 403
    code = "forbidden"


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class Conflict(ApiError):
    status_code = 409
    code = "conflict"


class StaleEpoch(Conflict):
    code = "stale_epoch"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"


class IntegrityError(ApiError):
    status_code = 422
    code = "integrity_error"


class InsufficientStorage(ApiError):
    status_code = 507
    code = "insufficient_storage"


API_ERRORS: dict[str, type[ApiError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        StaleEpoch,
        PayloadTooLarge,
        IntegrityError,
        InsufficientStorage,
    )
}


class CoordinatorUnavailable(TrainfleetError):
    """The coordinator could not be reached (connection refused, timeout, 5xx)."""


class UntrustedCertificate(CoordinatorUnavailable):
    """The coordinator's TLS certificate failed verification (untrusted CA, wrong name,
    expired). Unlike the rest of ``CoordinatorUnavailable``, waiting cannot fix it: a worker
    registering exits on it; calls that retry while unreachable still treat it as such."""


class StorageUnavailable(TrainfleetError):
    """The artifact store cannot be opened: no such bucket, no credentials or access, or the
    fsspec backend for its URL is not installed."""


class CorpusTooSmall(TrainfleetError):
    """A train or held-out split is shorter than one window of seq_len + 1 bytes."""


class SchemaTooNew(TrainfleetError):
    """The database was upgraded by a later trainfleet; this one refuses to touch it."""


class SchemaUnknown(TrainfleetError):
    """The database records schema versions no trainfleet wrote (another program's table)."""


class DataError(TrainfleetError):
    """A dataset spec cannot be materialized as it pins."""


class SourceUnavailable(DataError):
    """The dataset's source cannot be read on this machine (offline, missing files or extra)."""


class SourceMismatch(DataError):
    """The source differs from a value the spec pins (Python version, file list, content hash)."""


class ShardMismatch(DataError):
    """A shard rebuilt from its spec does not have the content hash recorded for it."""


class RoutingMismatch(DataError):
    """A router handed to a worker differs from the re-fit of its spec: refuse, never retry."""


class FeatureError(TrainfleetError):
    """A feature-store operation was refused (data plane). ``reason`` is a short machine
    word (``SampleGone``: "released", "aborted", "expired", "unknown"); ``code`` names the
    class, so a data-plane server can send it and a client raise the same class again
    (``FEATURE_ERRORS``)."""

    code = "feature_error"

    def __init__(self, message: str, *, reason: str = ""):
        self.message = message
        self.reason = reason or self.code
        super().__init__(message)


class SampleGone(FeatureError):
    """The sample was released, aborted or garbage-collected: a use after free."""

    code = "sample_gone"


class StaleGeneration(FeatureError):
    """The ref's generation is not its key's current one (the key was put again)."""

    code = "stale_generation"


class HashMismatch(FeatureError):
    """The bytes read do not hash to (or are not the size of) the ref's content hash."""

    code = "hash_mismatch"


class BadRef(FeatureError):
    """The ref's HMAC does not verify with this secret (forged, altered, other pipeline), or
    the ref names another store."""

    code = "bad_ref"


class FeatureAuthError(FeatureError):
    """The pipeline secret is missing or wrong (data-plane authentication)."""

    code = "feature_auth"


class Backpressure(FeatureError):
    """A put waited ``wait_s`` above the store's high watermark and gave up."""

    code = "backpressure"


class StoreUnavailable(FeatureError):
    """The feature store cannot be reached: connection refused, directory gone, closed."""

    code = "store_unavailable"


FEATURE_ERRORS: dict[str, type[FeatureError]] = {
    cls.code: cls
    for cls in (
        FeatureError,
        SampleGone,
        StaleGeneration,
        HashMismatch,
        BadRef,
        FeatureAuthError,
        Backpressure,
        StoreUnavailable,
    )
}
