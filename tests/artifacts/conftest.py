"""The artifact tests' S3 API server and per-test S3 store (tests/s3kit.py)."""

from s3kit import moto_server, s3_server, s3_store

__all__ = ["moto_server", "s3_server", "s3_store"]
