"""How ``server.serve`` configures uvicorn: the proxy-headers middleware runs only where the
operator named the proxies to trust (``FORWARDED_ALLOW_IPS``), not on every request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainfleet.artifacts import ArtifactStore
from trainfleet.coordinator import server
from trainfleet.coordinator.state import Coordinator
from trainfleet.queue.sqlite import SQLiteQueue


def uvicorn_kwargs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What ``serve`` passes to ``uvicorn.run`` (which returns at once here)."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: seen.update(kw))
    coord = Coordinator(
        queue=SQLiteQueue(tmp_path / "q.db"),
        store=ArtifactStore(tmp_path / "artifacts"),
        staging_dir=tmp_path / "staging",
        operator_token="op",
        join_token="join",
    )
    try:
        server.serve(coord, "127.0.0.1", 0)  # closes the queue
    finally:
        coord.db_executor.shutdown()
    return seen


def test_proxy_headers_are_off_without_trusted_proxies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(server.FORWARDED_ALLOW_IPS_ENV, raising=False)
    assert uvicorn_kwargs(tmp_path, monkeypatch)["proxy_headers"] is False


def test_proxy_headers_are_on_when_the_operator_names_the_proxies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(server.FORWARDED_ALLOW_IPS_ENV, "10.0.0.5")
    assert uvicorn_kwargs(tmp_path, monkeypatch)["proxy_headers"] is True
