"""A session's S3 API server for the object-storage tests (``trainfleet.testing.s3``).

``moto_server`` starts moto in server mode once per test session; ``s3_server`` exports the
standard AWS variables pointing at it for one test (restored after), so an
``ArtifactStore("s3://...")`` or a ``trainfleet serve`` subprocess finds it exactly as it
would find AWS S3 or MinIO. ``s3_store`` is a fresh bucket's store per test, with the
smallest part size S3 allows (5 MiB), so multipart uploads are exercised by artifacts of a
few MiB.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from trainfleet.artifacts import ArtifactStore
from trainfleet.artifacts.s3 import MIN_PART_BYTES
from trainfleet.testing.s3 import MotoServer

__all__ = ["PART", "moto_server", "s3_server", "s3_store"]

PART = MIN_PART_BYTES


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    pytest.importorskip("s3fs", reason="the s3 tests need the dev extra (s3fs)")
    pytest.importorskip("moto.server", reason="the s3 tests need the dev extra (moto[server])")
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3_server(moto_server: MotoServer) -> Iterator[MotoServer]:
    """The session's server, with the AWS variables set for this test only (restored after:
    other tests in the same process must not see them)."""
    with moto_server.environment():
        yield moto_server


@pytest.fixture
def s3_store(s3_server: MotoServer) -> ArtifactStore:
    return ArtifactStore(f"s3://{s3_server.create_bucket()}/artifacts", part_bytes=PART)
