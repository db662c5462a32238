"""Artifact storage: content-addressed objects (sha256) and deterministic directory archives.

``ArtifactStore`` keeps verified bytes under a local directory or any fsspec URL;
``pack_dir`` / ``unpack`` turn a job's output directory into one reproducible ``.tar.zst``
artifact and back, safely.
"""

from trainfleet.artifacts.pack import pack_dir, unpack
from trainfleet.artifacts.store import ArtifactStore, IngestBuffer, check_digest, sha256_file

__all__ = [
    "ArtifactStore",
    "IngestBuffer",
    "check_digest",
    "pack_dir",
    "sha256_file",
    "unpack",
]
