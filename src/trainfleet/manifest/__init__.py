"""The TOML manifest: typed specs, loading with precise errors, job identity, reload plans."""

from trainfleet.manifest.identity import job_id, manifest_hash
from trainfleet.manifest.load import load_manifest, parse_manifest
from trainfleet.manifest.spec import Defaults, HostPolicy, JobSpec, Manifest

__all__ = [
    "Defaults",
    "HostPolicy",
    "JobSpec",
    "Manifest",
    "job_id",
    "load_manifest",
    "manifest_hash",
    "parse_manifest",
]
