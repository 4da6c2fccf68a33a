"""Accounts as a new user meets them, in headless Chromium on the real engine:
the founder signs up (and becomes the admin), chats and rates; a second person
signs up and waits; the admin approves them in the dashboard, excludes them from
training and sees what their feedback reached; sign-out works."""

from __future__ import annotations

import os

import pytest
from sqlmodel import Session, select

from store.tables import Feedback, User
from tests.server.test_chat_ui import browser, send, wait_idle  # noqa: F401 - the browser fixture

pytestmark = [pytest.mark.engine, pytest.mark.browser]

ARTIFACTS = os.environ.get("TUNELOOP_TEST_ARTIFACTS", "test-artifacts")
PASSWORD = "a long enough password"


def new_page(browser):  # noqa: F811 - the fixture imported above
    context = browser.new_context(viewport={"width": 1100, "height": 850})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return context, page, errors


def sign_up(page, base_url: str, username: str) -> None:
    page.goto(base_url + "/signup")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("form.account-form button[type=submit]")


def user_row(server, username: str) -> User:
    with Session(server.app.state.db) as session:
        return session.exec(select(User).where(User.username == username)).one()


def test_sign_up_chat_rate_then_admin_approves_and_excludes(live_server, browser):  # noqa: F811
    server = live_server(default_max_tokens=16)
    founder_ctx, founder, founder_errors = new_page(browser)
    newcomer_ctx, newcomer, newcomer_errors = new_page(browser)
    try:
        # the first account becomes the admin and lands on the dashboard
        sign_up(founder, server.base_url, "founder")
        founder.wait_for_url("**/admin**")
        founder.goto(server.base_url + "/")
        assert founder.locator("#account-name").inner_text() == "founder"
        send(founder, "Say hello.")
        founder.wait_for_url("**/c/*")
        wait_idle(founder)
        answer = founder.locator("article.assistant").last
        answer.locator("button.thumb.up").click()
        founder.wait_for_selector("article.assistant button.thumb.up[aria-pressed=true]")
        founder_id = user_row(server, "founder").id
        with Session(server.app.state.db) as session:
            assert [f.rating for f in session.exec(select(Feedback).where(Feedback.user_id == founder_id))] == ["up"]

        # a second person signs up and waits for approval
        sign_up(newcomer, server.base_url, "newcomer")
        assert "waiting for an administrator" in newcomer.locator("#signup-pending").inner_text()
        newcomer_id = user_row(server, "newcomer").id

        # the admin approves them, then excludes them from training
        founder.goto(server.base_url + "/admin/users")
        row = founder.locator(f"#accounts-table tr[data-user-id='{newcomer_id}']")
        row.locator("button.approve").click()
        founder.wait_for_selector(f"#accounts-table tr[data-user-id='{newcomer_id}'][data-status=active]")
        founder.locator(f"#accounts-table tr[data-user-id='{newcomer_id}'] button.exclude").click()
        founder.wait_for_selector(f"#accounts-table tr[data-user-id='{newcomer_id}'][data-excluded=true]")
        assert "excluded from training" in founder.locator(".notice").first.inner_text()
        assert user_row(server, "newcomer").excluded_from_training
        assert founder.locator(f"#accounts-table tr[data-user-id='{founder_id}'] .reached").inner_text() == "none"
        os.makedirs(ARTIFACTS, exist_ok=True)
        founder.screenshot(path=os.path.join(ARTIFACTS, "admin-users.png"), full_page=True)

        # the approved newcomer signs in and chats; signing out ends the session
        newcomer.goto(server.base_url + "/login")
        newcomer.fill("#username", "newcomer")
        newcomer.fill("#password", PASSWORD)
        newcomer.click("form.account-form button[type=submit]")
        newcomer.wait_for_selector("#account-name")
        assert newcomer.locator("#account-name").inner_text() == "newcomer"
        newcomer.click("nav.account-nav button[type=submit]")
        newcomer.wait_for_url("**/login")
        assert newcomer.locator("#account-name").count() == 0
    finally:
        founder_ctx.close()
        newcomer_ctx.close()
    assert founder_errors == [] and newcomer_errors == []
