"""The admin dashboard in headless Chromium against a real server (uvicorn,
fake engine: the dashboard never asks the model anything) on a seeded store
(tests/support/admin_data.py): sign in, filter, read a run's charts, watch the
live status stop polling, roll back with the confirmation accepted, keys.

Screenshots of every page at 1280 px and 390 px go to ``$TUNELOOP_ADMIN_SHOTS``
(default /tmp/admin_shots)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlmodel import Session, select

from server.engine.fake import FakeChatEngine
from store.tables import AdapterVersion, ApiKey, TrainingRun
from tests.conftest import make_settings
from tests.support.admin_data import Seeded, seed
from tests.support.browser import wait_for_js
from tests.support.live import LiveServer, start_live_server

pytestmark = [pytest.mark.browser]

CHROMIUM = os.environ.get("TUNELOOP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SHOTS = Path(os.environ.get("TUNELOOP_ADMIN_SHOTS", "/tmp/admin_shots"))
TOKEN = "dev-admin-token"
WIDTHS = {"wide": 1280, "phone": 390}


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: `make test` installs Debian's chromium package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def start_dashboard(tmp_path, engine_loop, hold_retrain_lease: bool = False) -> tuple[LiveServer, Seeded]:
    # The server follows every activation at once: the seeded adapters get servable folders.
    settings = make_settings(tmp_path / "app", adapter_poll_seconds=3600)
    server = start_live_server(settings, FakeChatEngine(), engine_loop)
    return server, seed(server.app.state.db, hold_retrain_lease=hold_retrain_lease,
                        adapters_dir=settings.adapters_dir)


@pytest.fixture
def dashboard(tmp_path, engine_loop) -> Iterator[tuple[LiveServer, Seeded]]:
    server, data = start_dashboard(tmp_path, engine_loop)
    yield server, data
    server.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": WIDTHS["wide"], "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def sign_in(page, server: LiveServer, token: str = TOKEN) -> None:
    page.goto(server.base_url + "/admin/feedback")
    page.wait_for_url("**/admin/login?next=*")
    page.fill("#token", token)
    page.click("button[type=submit]")


def shoot(page, name: str) -> None:
    """Full-page screenshots of the current page at both widths."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for label, width in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(150)
        page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size({"width": WIDTHS["wide"], "height": 900})


def adapter_status(server: LiveServer) -> dict[str, str]:
    with Session(server.app.state.db) as session:
        return {row.name: row.status for row in session.exec(select(AdapterVersion)).all()}


def test_sign_in_then_every_page_renders(dashboard, page):
    server, data = dashboard
    sign_in(page, server, "wrong-token")
    error = page.locator("#login-error")
    error.wait_for()
    assert "not the admin token" in error.inner_text()
    shoot(page, "01-login-error")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url("**/admin/feedback")
    assert page.locator("#card-ratings .big").inner_text() == "3"
    assert page.locator("svg#chart-feedback-daily g#series-down path").count() > 0
    shoot(page, "02-feedback")

    pages = [
        ("03-conversations", "/admin/conversations", "li.conversation-card"),
        ("04-conversation", f"/admin/conversations/{data.moon}", "ol.transcript li.turn"),
        ("05-pairs", "/admin/pairs", "#pairs-table tbody tr"),
        ("06-runs", "/admin/runs", "#runs-table tbody tr"),
        ("07-run-finished", f"/admin/runs/{data.runs['promoted']}", "figure#plot-margin svg"),
        ("09-adapters", "/admin/adapters", "#adapters-table tbody tr"),
        ("10-lineage", "/admin/adapters/v2/lineage", "#lineage-pairs tbody tr"),
        ("11-keys", "/admin/keys", "form.create-key"),
    ]
    for name, path, selector in pages:
        nav_link = page.locator(f"nav.admin-nav a[href='{path}']")
        if nav_link.count():
            nav_link.click()  # boosted by htmx
        else:
            page.goto(server.base_url + path)
        page.wait_for_url(f"**{path}")
        page.locator(selector).first.wait_for()
        shoot(page, name)


def test_run_page_shows_the_orpo_curves_as_svg_lines(dashboard, page):
    server, data = dashboard
    sign_in(page, server)
    page.wait_for_url("**/admin/feedback")
    page.goto(f"{server.base_url}/admin/runs/{data.runs['promoted']}")
    for slug, series in [("loss", "loss"), ("loss", "nll-loss"), ("accuracy", "rewards-accuracies"),
                         ("margin", "rewards-margins"), ("log-odds", "log-odds-ratio")]:
        line = page.locator(f"figure#plot-{slug} svg g#series-{series} path").first
        box = line.bounding_box()
        assert box is not None and box["width"] > 100, f"{series} is not drawn across the chart: {box}"
    assert page.locator("#run-status").get_attribute("hx-trigger") is None


def test_leaderboard_renders_the_table_and_the_chart(dashboard, page):
    """The seeded store has one cross-version vote (base vs v2, both bad: half
    a win each) and one v2-vs-v2 vote; v1 served but was never compared."""
    server, _ = dashboard
    sign_in(page, server)
    page.wait_for_url("**/admin/feedback")
    page.click("nav.admin-nav a[href='/admin/leaderboard']")
    page.wait_for_url("**/admin/leaderboard")
    rows = page.locator("#leaderboard-table tbody tr")
    rows.first.wait_for()
    assert [rows.nth(i).get_attribute("data-version") for i in range(rows.count())] == ["base", "v2", "v1"]
    assert page.locator("#leaderboard-table tr.active-row").get_attribute("data-version") == "v2"
    assert "no A/B votes" in page.locator("tr[data-version=v1] td.note").inner_text()
    for version in ("base", "v2"):
        box = page.locator(f"figure#plot-leaderboard svg g#series-{version} path").first.bounding_box()
        assert box is not None and box["height"] > 0, f"{version} is not drawn: {box}"
    shoot(page, "15-leaderboard")


def test_filters_swap_results_and_push_the_url(dashboard, page):
    server, _ = dashboard
    sign_in(page, server)
    page.wait_for_url("**/admin/feedback")
    page.select_option("form.filters select[name=adapter]", "v2")
    page.wait_for_url("**adapter=v2**")
    wait_for_js(page, "document.querySelector('#card-ratings .big').textContent.trim() === '2'")
    assert page.locator("#card-up .big").inner_text() == "1"
    page.fill("form.filters input[name=tag]", "vague")
    page.press("form.filters input[name=tag]", "Enter")
    page.wait_for_url("**tag=vague**")
    wait_for_js(page, "document.querySelector('#card-ratings .big').textContent.trim() === '1'")
    assert page.locator("#card-down .big").inner_text() == "1"


def test_rollback_asks_first_and_changes_the_database(dashboard, page):
    server, _ = dashboard
    sign_in(page, server)
    page.wait_for_url("**/admin/feedback")
    page.click("nav.admin-nav a[href='/admin/adapters']")
    page.wait_for_url("**/admin/adapters")
    assert page.locator("#serving-now").inner_text() == "v2"

    questions: list[str] = []
    page.once("dialog", lambda dialog: (questions.append(dialog.message), dialog.dismiss()))
    page.click("#rollback")
    page.wait_for_timeout(500)
    assert questions and "Roll back v2?" in questions[0] and "v1" in questions[0]
    assert adapter_status(server)["v2"] == "active"  # dismissed: nothing happened

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#rollback")
    wait_for_js(page, "document.querySelector('#serving-now').textContent.trim() === 'v1'")
    assert "Rolled back" in page.locator("#adapters .notice.ok").inner_text()
    assert page.locator("tr[data-version=v2] td:nth-child(2) .status").inner_text() == "rolled back"
    assert adapter_status(server) == {"v1": "active", "v2": "rolled_back", "v3": "rejected", "v4": "failed"}
    shoot(page, "12-adapters-rolled-back")


def test_live_status_polls_while_running_and_stops_when_done(dashboard, page):
    server, data = dashboard
    run_id = data.runs["running"]
    sign_in(page, server)
    page.wait_for_url("**/admin/feedback")
    polls: list[str] = []
    page.on("request", lambda request: polls.append(request.url) if "/status" in request.url else None)
    page.goto(f"{server.base_url}/admin/runs/{run_id}")
    assert page.locator("#run-status").get_attribute("hx-trigger") == "every 2s"
    shoot(page, "08-run-running")
    deadline = time.monotonic() + 10
    while len(polls) < 2 and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert len(polls) >= 2, "the status widget did not poll"

    with Session(server.app.state.db) as session:
        run = session.get(TrainingRun, run_id)
        run.status, run.finished_at, run.progress = "rejected", datetime.now(timezone.utc), {"phase": "done"}
        session.add(run)
        session.commit()
    wait_for_js(page, "document.querySelector('#run-status')?.dataset.status === 'rejected'", timeout=10_000)
    page.wait_for_load_state("load")
    assert page.locator("#run-status").get_attribute("hx-trigger") is None
    settled = len(polls)
    page.wait_for_timeout(4500)
    assert len(polls) == settled, "the widget kept polling after the run finished"


def test_retrain_now_while_running_says_so(tmp_path, engine_loop, page):
    server, data = start_dashboard(tmp_path, engine_loop, hold_retrain_lease=True)
    try:
        sign_in(page, server)
        page.wait_for_url("**/admin/feedback")
        page.click("nav.admin-nav a[href='/admin/runs']")
        page.wait_for_url("**/admin/runs")
        page.click("#retrain-now")
        notice = page.locator("#retrain-result .notice.error")
        notice.wait_for()
        assert "already in progress" in notice.inner_text()
        assert notice.locator("a").get_attribute("href") == f"/admin/runs/{data.runs['running']}"
        shoot(page, "13-retrain-busy")
    finally:
        server.stop()


def test_create_and_revoke_an_api_key(dashboard, page):
    server, _ = dashboard
    sign_in(page, server)
    page.wait_for_url("**/admin/feedback")
    page.click("nav.admin-nav a[href='/admin/keys']")
    page.wait_for_url("**/admin/keys")
    page.fill("#key-name", "mobile-app")
    page.click("form.create-key button")
    key = page.locator("#new-key-value")
    key.wait_for()
    assert key.input_value().startswith("tl-")
    shoot(page, "14-key-created")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#keys-table button.revoke")
    page.wait_for_selector("#keys-table tr[data-revoked=true]")
    with Session(server.app.state.db) as session:
        assert [k.revoked_at is not None for k in session.exec(select(ApiKey)).all()] == [True]
