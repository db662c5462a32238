"""Job identity: sha256 of the canonical JSON of a job's identity fields.

Canonical means sorted keys, no whitespace, and numbers as JSON writes them, so neither key
order nor formatting in the TOML file changes an id; only what the job *is* does.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from trainfleet.manifest.spec import JobSpec, Manifest


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def job_id(job: JobSpec) -> str:
    """The job's id: 64 hex chars; the CLI shows the first 12."""
    return hashlib.sha256(canonical_json(job.identity()).encode()).hexdigest()


def manifest_hash(manifest: Manifest) -> str:
    """Digest of the whole parsed manifest (bound to every artifact produced under it)."""
    return hashlib.sha256(canonical_json(manifest.model_dump(mode="json")).encode()).hexdigest()
