"""How ``server.serve`` configures uvicorn: the proxy-headers middleware runs only where the
operator named the proxies to trust (``FORWARDED_ALLOW_IPS``), not on every request."""

from __future__ import annotations

import pytest

from trainfleet.coordinator import server


def test_proxy_headers_are_off_without_trusted_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(server.FORWARDED_ALLOW_IPS_ENV, raising=False)
    assert server.uvicorn_options()["proxy_headers"] is False


def test_proxy_headers_are_on_when_the_operator_names_the_proxies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(server.FORWARDED_ALLOW_IPS_ENV, "10.0.0.5")
    assert server.uvicorn_options()["proxy_headers"] is True
