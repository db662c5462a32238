"""Artifacts in an S3 bucket (AWS S3, MinIO, any S3 API): upload, refresh, probe, presign.

:class:`~trainfleet.artifacts.store.ArtifactStore` reaches S3 through s3fs like any fsspec
filesystem, but writes objects with the S3 calls below instead of s3fs's ``put_file``, so
that what happens to a large artifact is explicit rather than an s3fs default:

- **Threshold and part size.** An artifact of at most ``part_bytes`` (default
  :data:`DEFAULT_PART_BYTES`, 16 MiB) is one ``PutObject``; a larger one is a multipart
  upload of ``part_bytes`` parts (the last one shorter), sent one part at a time, so an
  upload holds one part in memory whatever the artifact's size. S3 refuses parts under
  5 MiB (:data:`MIN_PART_BYTES`) and more than 10,000 parts, so the part size grows for an
  artifact past 10,000 parts.
- **Verified before visible.** The coordinator has already checked the staged bytes against
  their sha256 before calling :func:`upload`. Each request carries the SHA-256 of its body
  (``ChecksumSHA256``; for a single PUT that is the artifact's own digest), which S3
  verifies before accepting it. An S3 object appears only when its ``PutObject`` or
  ``CompleteMultipartUpload`` succeeds; any failure aborts the multipart upload, so a
  reader never sees a partial object under a digest's name. (A coordinator killed mid-upload
  leaves an incomplete multipart upload: invisible, but billed until a bucket lifecycle rule
  ``AbortIncompleteMultipartUpload`` removes it.)
- **Content-addressed, written once.** Two coordinators racing on one digest both write the
  same bytes; whichever lands last is identical.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import time
from typing import Any, BinaryIO

from trainfleet.errors import StorageUnavailable

MIN_PART_BYTES = 5 * 1024 * 1024
DEFAULT_PART_BYTES = 16 * 1024 * 1024
MAX_PARTS = 10_000
MAX_COPY_BYTES = 5 * 1024**3  # the largest object one CopyObject may copy (S3's limit)


def is_s3(fs: Any) -> bool:
    """Whether ``fs`` is an s3fs filesystem (protocol ``s3``/``s3a``)."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return "s3" in protocol


def default_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Storage options for ``url`` with our S3 defaults under the caller's: no listings
    cache, since another coordinator (or the GC) may add or delete objects at any time."""
    if url.split("://", 1)[0] in ("s3", "s3a"):
        return {"use_listings_cache": False, **options}
    return dict(options)


def part_size(size: int, part_bytes: int) -> int:
    """The part size for an artifact of ``size`` bytes: ``part_bytes``, grown (to whole MiB)
    when the artifact would need more than 10,000 parts."""
    if part_bytes < MIN_PART_BYTES:
        raise ValueError(f"S3 parts must be at least {MIN_PART_BYTES} bytes, got {part_bytes}")
    needed = -(-size // MAX_PARTS)
    if needed > part_bytes:
        mib = 1024 * 1024
        return -(-needed // mib) * mib
    return part_bytes


def split(path: str) -> tuple[str, str]:
    """``bucket/key/...`` into ``(bucket, key)``."""
    bucket, _, key = path.partition("/")
    return bucket, key


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def upload(fs: Any, staged: str | os.PathLike[str], path: str, sha256: str, part_bytes: int) -> int:
    """Write the verified file ``staged`` (whose digest is ``sha256``) to ``path``
    (``bucket/key``): one PUT up to ``part_bytes``, else multipart. Returns the parts sent
    (1 for a single PUT)."""
    bucket, key = split(path)
    size = os.path.getsize(staged)
    with open(staged, "rb") as f:
        if size <= part_bytes:
            fs.call_s3(
                "put_object",
                Bucket=bucket,
                Key=key,
                Body=f.read(),
                ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode(),
            )
            parts = 1
        else:
            parts = _multipart(fs, f, bucket, key, part_size(size, part_bytes))
    fs.invalidate_cache(path)
    return parts


def _multipart(fs: Any, f: BinaryIO, bucket: str, key: str, part_bytes: int) -> int:
    mpu = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")
    upload_id = mpu["UploadId"]
    done: list[dict[str, Any]] = []
    try:
        while chunk := f.read(part_bytes):
            number = len(done) + 1
            checksum = _b64_sha256(chunk)
            reply = fs.call_s3(
                "upload_part",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=chunk,
                ChecksumSHA256=checksum,
            )
            done.append({"PartNumber": number, "ETag": reply["ETag"], "ChecksumSHA256": checksum})
        fs.call_s3(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": done},
        )
    except BaseException:
        # The original error is what the caller must see; an abort that fails too (the same
        # broken network) leaves an incomplete upload for the bucket's lifecycle rule.
        with contextlib.suppress(Exception):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    return len(done)


def refresh(
    fs: Any, staged: str | os.PathLike[str], path: str, sha256: str, part_bytes: int
) -> None:
    """Restart an existing object's GC grace period (its LastModified), as ``os.utime`` does
    for a local blob: an object re-committed by a new upload must not be collected before
    that upload binds it, by this coordinator or another one. A copy onto itself (server
    side, no bytes through us) up to 5 GiB; a larger object is uploaded again."""
    bucket, key = split(path)
    if os.path.getsize(staged) > MAX_COPY_BYTES:
        upload(fs, staged, path, sha256, part_bytes)
        return
    fs.call_s3(
        "copy_object",
        Bucket=bucket,
        Key=key,
        CopySource={"Bucket": bucket, "Key": key},
        MetadataDirective="REPLACE",
        Metadata={"trainfleet-refreshed": f"{time.time():.3f}"},
    )
    fs.invalidate_cache(path)


def probe(fs: Any, root: str) -> None:
    """Fail fast, with a clear message, when the bucket under ``root`` cannot be listed."""
    bucket, key = split(root)
    prefix = f"{key}/" if key else ""
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except FileNotFoundError:
        raise StorageUnavailable(
            f"artifact bucket {bucket!r} does not exist (create it first; trainfleet does not"
            " create buckets)"
        ) from None
    except Exception as err:  # PermissionError, no endpoint, bad credentials ...
        raise StorageUnavailable(
            f"cannot list artifact bucket s3://{root}: {err} (credentials and endpoint come"
            " from the AWS environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,"
            " AWS_ENDPOINT_URL_S3, AWS_PROFILE ...)"
        ) from None


def presign(fs: Any, path: str, expires_s: int) -> str:
    """A URL that GETs ``path`` (``bucket/key``) for ``expires_s`` seconds, no credentials."""
    return str(fs.url(path, expires=expires_s))
