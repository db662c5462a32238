"""The dashboard's server side against a live coordinator: the summary call is the operator's
only, its numbers are the queue's, and the static route serves the page's own files, and
nothing else, with a strict Content-Security-Policy."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetkit import make_cap
from trainfleet.client import Client
from trainfleet.testing import LiveFleet

MANIFEST = """
[[jobs]]
name = "gpu-train"
require_cuda = true
min_vram_gib = 24
hyper = { steps = 5 }

[[jobs]]
name = "big-ram"
min_ram_gib = 4096
hyper = { steps = 5 }

[[jobs]]
name = "after-gpu"
after = ["gpu-train"]
hyper = { steps = 5 }
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    with LiveFleet(tmp_path_factory.mktemp("dashboard-api"), heartbeat_timeout_s=30.0) as live:
        live.reload(MANIFEST)
        yield live


@pytest.fixture(scope="module")
def http(fleet: LiveFleet) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def worker_token(fleet: LiveFleet) -> str:
    with Client(fleet.url, fleet.worker_token("cpu-a")) as c:
        token: str = c.register(make_cap("cpu-a").model_dump(mode="json"))["token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def summary(fleet: LiveFleet, http: httpx.Client) -> dict[str, Any]:
    r = http.get("/v1/dashboard", headers=bearer(fleet.operator_token))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_the_summary_needs_the_operator_token(
    fleet: LiveFleet, http: httpx.Client, worker_token: str
) -> None:
    for headers, codes in (
        ({}, {401}),
        (bearer("not-a-token"), {401}),
        (bearer(worker_token), {401, 403}),
        (bearer(fleet.worker_token("cpu-a")), {401, 403}),
    ):
        r = http.get("/v1/dashboard", headers=headers)
        assert r.status_code in codes, (headers, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]
        assert "counts" not in r.json()


def test_the_summary_counts_are_the_queues(
    fleet: LiveFleet, http: httpx.Client, worker_token: str
) -> None:
    body = summary(fleet, http)
    status = fleet.operator.status()
    assert body["counts"] == status["counts"]
    assert body["counts"]["pending"] == 2 and body["counts"]["waiting"] == 1
    for group in ("waiting", "pending", "failed", "completed", "cancelled"):
        assert body["jobs"][group]["total"] == status["counts"].get(group, 0)
    running = status["counts"].get("claimed", 0) + status["counts"].get("running", 0)
    assert body["jobs"]["running"]["total"] == running
    assert [w["id"] for w in body["workers"]] == [w["id"] for w in fleet.operator.workers()]
    assert {h["name"] for h in body["hosts"]} == {"cpu-a"}
    assert body["manifest_hash"] == status["manifest_hash"]
    assert body["fair_share"] is not None


def test_pending_and_waiting_jobs_carry_their_explain_text(
    fleet: LiveFleet, http: httpx.Client
) -> None:
    body = summary(fleet, http)
    pending = {j["job"]["name"]: j["explain"] for j in body["jobs"]["pending"]["jobs"]}
    assert set(pending) == {"gpu-train", "big-ram"}
    for name, text in pending.items():
        assert text == fleet.operator.explain(name)["message"]
    assert "CUDA" in pending["gpu-train"] or "cuda" in pending["gpu-train"]
    (waiting,) = body["jobs"]["waiting"]["jobs"]
    assert waiting["job"]["name"] == "after-gpu"
    assert "waiting for gpu-train (pending)" in waiting["explain"]


def test_the_page_and_its_files_are_served_with_a_strict_policy(http: httpx.Client) -> None:
    page = http.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(referenced) == ["dashboard/static/app.js", "dashboard/static/style.css"]
    for path, media in (("/dashboard", "text/html"), *((f"/{p}", "text/") for p in referenced)):
        r = http.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(media)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-cache"
    assert (
        http.get("/dashboard/static/app.js").headers["content-type"].startswith("text/javascript")
    )


def test_the_page_has_no_inline_script_or_style() -> None:
    folder = Path(__file__).parents[2] / "src/trainfleet/coordinator/dashboard"
    html = (folder / "index.html").read_text()
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None
    assert re.search(r"\sstyle=|<style|\son[a-z]+=", html) is None
    assert ".innerHTML" not in (folder / "app.js").read_text()


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/static/nope.js",
        "/dashboard/static/..%2Fapp.py",
        "/dashboard/static/%2E%2E%2Froutes_dashboard.py",
        "/dashboard/static/..%2F..%2F__init__.py",
        "/dashboard/static/%2Fetc%2Fpasswd",
        "/dashboard/static/app.js%2F",
    ],
)
def test_nothing_but_the_pages_files_is_served(http: httpx.Client, path: str) -> None:
    r = http.get(path)
    assert r.status_code == 404, (path, r.text)
    assert r.json()["error"] == "not_found"


def test_a_dot_dot_path_reaches_nothing(fleet: LiveFleet) -> None:
    # httpx normalizes '..' in a URL: send the raw request line as a hostile client would.
    host, port = fleet.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"GET /dashboard/static/../app.py HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"404", head
    assert b"import" not in body


def test_an_unchanged_file_is_answered_304(http: httpx.Client) -> None:
    first = http.get("/dashboard/static/style.css")
    etag = first.headers["etag"]
    again = http.get("/dashboard/static/style.css", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    other = http.get("/dashboard/static/style.css", headers={"If-None-Match": '"stale"'})
    assert other.status_code == 200 and other.content == first.content
