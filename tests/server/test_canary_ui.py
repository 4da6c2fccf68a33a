"""The canary in headless Chromium against a live server (fake engine): a chat
turn during a canary is a blind A/B turn of the canary and the active version,
chosen with a click; the adapters page shows the canary's votes and interval
and ends it by hand (confirmed first); the leaderboard ranks the two with
intervals. Screenshots go to ``$TUNELOOP_ADMIN_SHOTS`` (default /tmp/admin_shots)."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlmodel import Session, select

from server.engine.fake import FakeChatEngine
from store.canary import start_canary
from store.db import session_scope
from store.registry import get_version
from store.tables import AdapterVersion, Comparison, Message
from tests.conftest import make_settings
from tests.server.test_admin_ui import browser, page, shoot, sign_in  # noqa: F401 - fixtures
from tests.server.test_chat_ui import send, wait_idle
from tests.support.adapter_folders import servable_folder
from tests.support.live import start_live_server

pytestmark = [pytest.mark.browser]
ADMIN = {"Authorization": "Bearer dev-admin-token"}


@pytest.fixture
def server(tmp_path, engine_loop):
    settings = make_settings(tmp_path / "app", canary=True, canary_ab_rate=1.0, canary_min_votes=1000,
                             canary_check_seconds=0.2, adapter_poll_seconds=0.5, default_max_tokens=6,
                             train_on_anonymous=True)  # the browser's visitor is anonymous: its vote counts
    engine = FakeChatEngine()
    engine_loop.run(engine.start())
    live = start_live_server(settings, engine, engine_loop)
    with session_scope(live.app.state.db) as session:
        session.add(AdapterVersion(version=1, path=str(servable_folder(settings.adapters_dir / "v1")),
                                   status="retired"))
    with session_scope(live.app.state.db) as session:
        start_canary(session, get_version(session, 1), "base")
    deadline = time.monotonic() + 10
    while (httpx.get(live.base_url + "/healthz").json()["beside"] or {}).get("adapter") != "v1":
        assert time.monotonic() < deadline, "v1 not served beside the base model"
        time.sleep(0.05)
    yield live
    live.stop()


def test_a_chat_turn_during_a_canary_is_a_blind_ab_turn_and_the_admin_reads_and_ends_it(server, page):  # noqa: F811
    page.goto(server.base_url + "/")
    send(page, "Name a fruit.")
    page.wait_for_url("**/c/*")
    page.wait_for_selector(".comparison")
    wait_idle(page)
    with Session(server.app.state.db) as session:
        (comparison,) = session.exec(select(Comparison)).all()
        sides = {m.id: m.adapter_version or "base"
                 for m in session.exec(select(Message).where(Message.role == "assistant")).all()}
    assert sorted(sides.values()) == ["base", "v1"]
    assert "v1" not in page.locator(".comparison").inner_text().replace("[v1]", "")  # blind
    canary_side = "1" if sides[comparison.message_a_id] == "v1" else "2"
    page.wait_for_selector(".comparison .choice-form button:not([disabled])")
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press(canary_side)
    page.wait_for_selector(".comparison", state="detached")

    sign_in(page, server)
    page.goto(server.base_url + "/admin/adapters")
    panel = page.locator("#canary-panel")
    panel.wait_for()
    text = panel.inner_text()
    assert "Canary: v1 against base" in text and "1 vote counted" in text and "1 won" in text
    assert page.locator("#canary-panel .interval").inner_text().startswith("[")
    shoot(page, "20-canary")

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#canary-promote")
    page.wait_for_selector("#canary-panel", state="detached")
    assert page.locator("#serving-now").inner_text() == "v1"
    with Session(server.app.state.db) as session:
        assert get_version(session, 1).status == "active"

    page.goto(server.base_url + "/admin/leaderboard")
    rows = page.locator("#leaderboard-table tbody tr")
    assert sorted(rows.nth(i).get_attribute("data-version") for i in range(rows.count())) == ["base", "v1"]
    assert page.locator("#leaderboard-table tr[data-version=v1] td.score-interval").inner_text().strip() != ""
    shoot(page, "21-leaderboard-after-canary")
