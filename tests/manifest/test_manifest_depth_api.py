"""One manifest nesting limit: ``POST /v1/manifest`` refuses exactly what the loader
(and so ``trainfleet reload``) refuses, by its own pre-parse check, for every way TOML nests."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from fleetkit import FakeClock
from trainfleet.artifacts import ArtifactStore
from trainfleet.coordinator.app import create_app
from trainfleet.coordinator.state import Coordinator
from trainfleet.errors import ManifestError
from trainfleet.manifest import parse_manifest
from trainfleet.manifest.load import MAX_DEPTH
from trainfleet.queue import QueueSettings
from trainfleet.queue.sqlite import SQLiteQueue

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 under its TestClient; the project depends on httpx.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

OP = {"Authorization": "Bearer op-token"}
JOB = '[[jobs]]\nname = "a"\nkind = "command"\ncommand = ["true"]\n'

# Each builds a manifest whose deepest table or array is ``n`` levels below the top level.
SHAPES = {
    "arrays": lambda n: "x = " + "[" * n + "]" * n + "\n",
    "arrays-in-a-job": lambda n: JOB + "x = " + "[" * (n - 2) + "]" * (n - 2) + "\n",
    "inline-tables": lambda n: "x = " + "{a = " * n + "1" + "}" * n + "\n",
    "dotted-keys": lambda n: "a" + ".a" * n + " = 1\n",
    "table-header": lambda n: "[" + ".".join(["t"] * n) + "]\nx = 1\n",
    "job-hyper": lambda n: JOB.replace("kind", "hyper." + ".".join(["h"] * (n - 2)) + " = 1\nkind"),
}


@pytest.fixture
def http(tmp_path: Path) -> Iterator[TestClient]:
    queue = SQLiteQueue(tmp_path / "q.db", settings=QueueSettings(), clock=FakeClock())
    coord = Coordinator(
        queue=queue,
        store=ArtifactStore(tmp_path / "artifacts"),
        staging_dir=tmp_path / "staging",
        operator_token="op-token",
        join_token="join-token",
    )
    try:
        with TestClient(create_app(coord)) as client:
            yield client
    finally:
        queue.close()


def loader_says_too_deep(text: str) -> bool:
    try:
        parse_manifest(text)
    except ManifestError as err:
        return any("nested deeper than" in p for p in err.problems)
    return False


def endpoint_says_too_deep(http: TestClient, text: str) -> tuple[bool, dict[str, Any]]:
    r = http.post("/v1/manifest", json={"text": text, "dry_run": True}, headers=OP)
    body = r.json()
    assert r.status_code in (200, 400), r.text  # never a 500
    return r.status_code == 400 and "nests deeper than" in body["message"], body


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_endpoint_and_the_loader_share_one_nesting_limit(http: TestClient, shape: str):
    at_limit, over = SHAPES[shape](MAX_DEPTH), SHAPES[shape](MAX_DEPTH + 1)
    assert not loader_says_too_deep(at_limit) and loader_says_too_deep(over)
    assert endpoint_says_too_deep(http, at_limit)[0] is False
    refused, body = endpoint_says_too_deep(http, over)
    assert refused, body
    assert f"nests deeper than {MAX_DEPTH} levels" in body["message"]


def test_the_manifest_limit_is_below_the_json_body_limit():
    """The manifest travels inside a JSON body, whose own (larger) limit never bites first."""
    from trainfleet.coordinator.bodies import MAX_DEPTH as JSON_MAX_DEPTH

    assert MAX_DEPTH == 32 and JSON_MAX_DEPTH >= MAX_DEPTH
