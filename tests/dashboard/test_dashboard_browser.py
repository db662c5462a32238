"""The dashboard in a real headless Chromium (Playwright, Debian's chromium) against a live
fleet (``dashseed``): each page renders what ``GET /v1/dashboard`` says, a bad token and an
unreachable coordinator are shown, a cancel, a requeue and a revoke from the page take effect
after a confirmation, and HTML a worker made up stays text. A screenshot of each page is saved
for review, in ``$DASHBOARD_SCREENSHOTS`` or the test's temporary folder (the path is
printed)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dashseed
import httpx
import pytest

from trainfleet.testing import LiveFleet, wait_until

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
MISSING = "the browser tests need Debian's chromium and playwright: `make browser` installs them"
WAIT_MS = 10_000  # a few polls (every 2 s)

try:
    from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None


def _chromium() -> str:
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path is None or sync_playwright is None:
        if os.environ.get("CI"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = _chromium()
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    with LiveFleet(tmp_path_factory.mktemp("dashboard"), heartbeat_timeout_s=30.0) as live:
        dashseed.seed(live)
        yield live


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"dashboard screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def page(browser: Browser, fleet: LiveFleet) -> Iterator[Page]:
    """A page logged in with the operator token (1280x800)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    logged_in = context.new_page()
    errors: list[str] = []
    logged_in.on("pageerror", lambda err: errors.append(str(err)))
    logged_in.goto(f"{fleet.url}/dashboard")
    logged_in.fill("#token", fleet.operator_token)
    logged_in.click("#login-button")
    expect(logged_in.locator("#app")).to_be_visible()
    yield logged_in
    context.close()
    assert not errors, errors  # no script error on any page


def summary(fleet: LiveFleet) -> dict[str, Any]:
    r = httpx.get(
        f"{fleet.url}/v1/dashboard", headers={"Authorization": f"Bearer {fleet.operator_token}"}
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def open_tab(page: Page, name: str) -> Locator:
    """Show tab ``name``; its section (other tabs keep what they last showed, hidden)."""
    page.click(f'[data-tab="{name}"]')
    tab = page.get_by_test_id(f"tab-{name}")
    expect(tab).to_be_visible()
    return tab


def screenshot(page: Page, shots: Path, name: str) -> None:
    path = shots / f"dashboard-{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 0


def test_a_bad_token_returns_to_the_form_with_the_reason(
    browser: Browser, fleet: LiveFleet
) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{fleet.url}/dashboard")
        expect(page.locator("#app")).to_be_hidden()
        page.fill("#token", "not-the-operator-token")
        page.click("#login-button")
        expect(page.get_by_test_id("login-message")).to_contain_text("401")
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#app")).to_be_hidden()
        assert page.evaluate("sessionStorage.length") == 0
    finally:
        context.close()


def test_the_fleet_page_shows_the_workers(page: Page, fleet: LiveFleet, shots: Path) -> None:
    tab = open_tab(page, "fleet")
    data = summary(fleet)
    rows = tab.get_by_test_id("worker-row")
    expect(rows).to_have_count(len(data["workers"]))
    online = sum(w["state"] == "online" for w in data["workers"])
    expect(tab.get_by_test_id("workers-online")).to_have_text(str(online))
    for state, count in data["counts"].items():
        expect(tab.get_by_test_id(f"count-{state}")).to_have_text(str(count))
    real = next(w for w in data["workers"] if w["host"] == "cpu-a")
    row = tab.locator(f'[data-worker-id="{real["id"]}"]')
    expect(row.get_by_test_id("current-job")).to_have_text("long-job")
    assert real["notes"], "the host policy corrects the detected capability"
    expect(row).to_contain_text(real["notes"][0])
    expect(row.get_by_test_id("effective")).to_contain_text(f"{real['effective']['cores']} cores")
    # a hostname a worker made up is text, not an element
    expect(tab.get_by_text(dashseed.XSS).first).to_be_visible()
    assert tab.locator("img").count() == 0
    expect(tab.get_by_test_id("host-row")).to_have_count(len(data["hosts"]))
    screenshot(page, shots, "fleet")


def test_the_queue_page_matches_the_api(page: Page, fleet: LiveFleet, shots: Path) -> None:
    tab = open_tab(page, "queue")
    data = summary(fleet)
    for state, count in data["counts"].items():
        expect(tab.get_by_test_id(f"count-{state}")).to_have_text(str(count))
    for state, group in data["jobs"].items():
        expect(tab.get_by_test_id(f"group-total-{state}")).to_have_text(str(group["total"]))
    gpu = tab.locator('[data-job-name="gpu-train"]')
    explain = next(j for j in data["jobs"]["pending"]["jobs"] if j["job"]["name"] == "gpu-train")
    # the explain text's lines about the hosts (its first and last lines count time)
    for line in explain["explain"].splitlines()[1:-1]:
        expect(gpu.get_by_test_id("explain")).to_contain_text(line.strip())
    expect(gpu.get_by_test_id("explain")).to_contain_text("needs CUDA >= 24 GiB")
    waiting = tab.locator('[data-job-name="after-gpu"]')
    expect(waiting.get_by_test_id("explain")).to_contain_text("waiting for gpu-train (pending)")
    running = tab.locator('[data-job-name="long-job"]')
    expect(running.get_by_test_id("log-tail")).to_contain_text("tick")
    failed = tab.locator('[data-job-name="bad-job"]')
    expect(failed.get_by_test_id("job-error")).to_contain_text("exit code 3")
    expect(failed.get_by_test_id("log-tail")).to_contain_text("out of patience")
    # a log line that is HTML shows as that text and creates no element
    expect(failed.get_by_test_id("log-tail")).to_contain_text(dashseed.XSS)
    assert page.locator("main img").count() == 0
    assert page.evaluate("window.__pwned") is None
    screenshot(page, shots, "queue")


def test_the_runs_page_shows_the_rounds(page: Page, fleet: LiveFleet, shots: Path) -> None:
    tab = open_tab(page, "runs")
    (run,) = summary(fleet)["runs"]
    card = tab.locator(f'[data-run-name="{dashseed.RUN}"]')
    expect(card.get_by_test_id("run-state")).to_have_text("completed")
    rows = card.get_by_test_id("round-row")
    expect(rows).to_have_count(len(run["rounds"]))
    for i, r in enumerate(run["rounds"]):
        row = rows.nth(i)
        expect(row.get_by_test_id("round-loss")).to_have_text(f"{r['heldout_loss']:.4f}")
        expect(row.get_by_test_id("round-bytes-up")).to_have_text(str(r["bytes_up"]))
        expect(row.get_by_test_id("participants")).to_have_text(", ".join(run["participants"][i]))
    (refused,) = run["refused"]
    expect(card.get_by_test_id("refused-row")).to_contain_text(refused["reason"])
    # one point per round with a loss; up and down bytes per round
    expect(card.locator('[data-testid="loss-chart"] circle')).to_have_count(len(run["rounds"]))
    expect(card.locator('[data-testid="bytes-chart"] circle')).to_have_count(2 * len(run["rounds"]))
    screenshot(page, shots, "runs")


def test_the_market_and_fair_share_pages_match_the_api(
    page: Page, fleet: LiveFleet, shots: Path
) -> None:
    tab = open_tab(page, "market")
    market = summary(fleet)["market"]
    expect(tab.get_by_test_id("total-paid")).to_have_text(f"{market['total_paid']:.2f}")
    (competition,) = market["competitions"]
    board = tab.get_by_test_id("leaderboard-row")
    expect(board).to_have_count(len(competition["leaderboard"]))
    for i, s in enumerate(competition["leaderboard"]):
        expect(board.nth(i).get_by_test_id("trusted-score")).to_have_text(
            f"{s['trusted_score']:.4f}"
        )
    ledger = tab.get_by_test_id("ledger-row")
    expect(ledger).to_have_count(len(market["ledger"]))
    expect(ledger.first.get_by_test_id("ledger-amount")).to_have_text(
        f"{market['ledger'][0]['amount']:.2f}"
    )
    screenshot(page, shots, "market")

    tab = open_tab(page, "fair-share")
    report = summary(fleet)["fair_share"]
    expect(tab.get_by_test_id("fair-share-row")).to_have_count(len(report["submitters"]))
    for s in report["submitters"]:
        row = tab.locator(f'[data-testid="fair-share-row"][data-submitter="{s["submitter"]}"]')
        expect(row.get_by_test_id("fs-pending")).to_have_text(str(s["pending"]))
    screenshot(page, shots, "fair-share")


def test_an_unreachable_coordinator_shows_a_banner(page: Page) -> None:
    open_tab(page, "fleet")
    page.route("**/v1/dashboard", lambda route: route.abort())
    try:
        expect(page.get_by_test_id("error-banner")).to_contain_text(
            "coordinator unreachable", timeout=WAIT_MS
        )
    finally:
        page.unroute("**/v1/dashboard")
    expect(page.get_by_test_id("error-banner")).to_be_hidden(timeout=WAIT_MS)
    expect(page.get_by_test_id("updated")).to_contain_text("updated")


def test_a_cancel_from_the_page_asks_first_then_takes_effect(
    page: Page, fleet: LiveFleet, shots: Path
) -> None:
    tab = open_tab(page, "queue")
    job = tab.locator('[data-job-name="cancel-me"]')
    expect(job).to_have_attribute("data-state", "pending")
    dialog = page.get_by_test_id("confirm-dialog")

    job.get_by_test_id("cancel").click()
    expect(dialog).to_be_visible()
    expect(page.get_by_test_id("confirm-text")).to_contain_text("cancel-me")
    page.get_by_test_id("confirm-no").click()
    expect(dialog).to_be_hidden()
    assert fleet.job("cancel-me")["job"]["state"] == "pending"

    job.get_by_test_id("cancel").click()
    expect(dialog).to_be_visible()
    screenshot(page, shots, "confirm")
    page.get_by_test_id("confirm-yes").click()
    expect(page.get_by_test_id("action-result")).to_contain_text("cancel-me is now cancelled")
    wait_until(lambda: fleet.job("cancel-me")["job"]["state"] == "cancelled", 10, "the cancel")
    expect(tab.locator('[data-job-name="cancel-me"]')).to_have_attribute(
        "data-state", "cancelled", timeout=WAIT_MS
    )
    expect(tab.get_by_test_id("count-cancelled")).to_have_text(
        str(summary(fleet)["counts"]["cancelled"]), timeout=WAIT_MS
    )


def confirm(page: Page, button: Locator, names: str) -> None:
    """Click an action's button, check its dialog names ``names``, and say yes."""
    dialog = page.get_by_test_id("confirm-dialog")
    button.click()
    expect(dialog).to_be_visible()
    expect(page.get_by_test_id("confirm-text")).to_contain_text(names)
    page.get_by_test_id("confirm-yes").click()
    expect(dialog).to_be_hidden()


def test_a_requeue_from_the_page_takes_effect(page: Page, fleet: LiveFleet) -> None:
    # huge-ram needs 4096 GiB: once requeued it stays pending, whatever else the fleet does
    fleet.operator.cancel("huge-ram")
    tab = open_tab(page, "queue")
    job = tab.locator('[data-job-name="huge-ram"]')
    expect(job).to_have_attribute("data-state", "cancelled", timeout=WAIT_MS)
    confirm(page, job.get_by_test_id("requeue"), "huge-ram")
    expect(page.get_by_test_id("action-result")).to_contain_text("huge-ram is now pending")
    assert fleet.job("huge-ram")["job"]["state"] == "pending"
    expect(tab.locator('[data-job-name="huge-ram"]')).to_have_attribute(
        "data-state", "pending", timeout=WAIT_MS
    )


def test_a_revoke_from_the_page_takes_effect(page: Page, fleet: LiveFleet) -> None:
    # a scripted replica worker: it holds no job, so nothing else in the fleet moves
    worker = next(w for w in summary(fleet)["workers"] if w["host"] == dashseed.REPLICA_HOSTS[1])
    tab = open_tab(page, "fleet")
    row = tab.locator(f'[data-worker-id="{worker["id"]}"]')
    expect(row).to_have_attribute("data-state", worker["state"])
    confirm(page, row.get_by_test_id("revoke"), worker["id"][:8])
    expect(page.get_by_test_id("action-result")).to_contain_text("revoked")
    states = {w["id"]: w["state"] for w in fleet.operator.workers()}
    assert states[worker["id"]] == "revoked"
    expect(tab.locator(f'[data-worker-id="{worker["id"]}"]')).to_have_attribute(
        "data-state", "revoked", timeout=WAIT_MS
    )
    expect(row.get_by_test_id("revoke")).to_have_count(0)
